"""YAML file + `dotted.key=value` overrides -> a typed, validated `Config`.

OmegaConf does the merging, type conversion and `${...}` interpolation. We check unknown keys ourselves
first, because OmegaConf's message does not say what the user probably meant.
"""

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config.checks import ConfigError, check_choices
from trainer.config.schema import CHOICES, Config


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads the YAML at `path` (None: only defaults), applies overrides, returns the typed config."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml errors carry line numbers; keep them on one line
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(OmegaConf.to_container(layers[0]), dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (job:, model:, ...)")
    layers.append(_parse_overrides(overrides))

    for layer in layers:
        _check_keys(OmegaConf.to_container(layer), Config, prefix="")

    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    except TypeError:  # OmegaConf's own, for a mapping given where a list belongs (or the reverse)
        raise ConfigError(_container_mismatch(schema, layers)) from None
    _words_read_as_booleans(cfg)
    check_choices(cfg)
    return cfg


def _container_mismatch(schema, layers) -> str:
    """Names the key whose value is a mapping where the schema has a list, or a list where it has a mapping."""
    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            want = OmegaConf.select(schema, dotted, throw_on_missing=False)
            if isinstance(value, dict) and isinstance(want, ListConfig):
                return f"config key '{dotted}' takes a list ([a, b]), not a mapping"
            if isinstance(value, list) and isinstance(want, DictConfig):
                return f"config key '{dotted}' takes a mapping (key: value), not a list"
            if isinstance(value, dict) and isinstance(want, DictConfig):
                found = walk(value, f"{dotted}.")
                if found:
                    return found
        return None

    for layer in layers:
        found = walk(OmegaConf.to_container(layer), "")
        if found:
            return found
    return "a config key holds a mapping where a list belongs, or a list where a mapping belongs"


def _words_read_as_booleans(cfg: Config) -> None:
    """YAML reads on / off (and yes / no, true / false) as booleans, which a word-valued key then holds as
    'True' / 'False': a key whose choices are on and off gets its word back."""
    for dotted, allowed in CHOICES.items():
        section, key = (getattr(cfg, dotted.split(".")[0]), dotted.split(".")[1])
        if {"on", "off"} <= set(allowed) and getattr(section, key) in ("True", "False"):
            setattr(section, key, "on" if getattr(section, key) == "True" else "off")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _parse_overrides(overrides: list[str]):
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. training.steps=50)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {_one_line(e)}") from None
    except Exception as e:  # the YAML reader's own errors (control characters, bad quoting, ...)
        raise ConfigError(f"bad override among {' '.join(overrides)!r}: {' '.join(str(e).split())[:200]}") from None


def _check_keys(tree: Any, schema: type, prefix: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        if key not in fields:
            where = prefix.rstrip(".") or "the top level"
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            # A key with control characters (a stray newline) is shown escaped, so the error stays one line.
            shown = f"{prefix}{key}" if str(key).isprintable() else repr(f"{prefix}{key}")[1:-1]
            raise ConfigError(f"unknown config key '{shown}' in {where}{hint}")
        sub = fields[key].type
        if dataclasses.is_dataclass(sub):
            _check_keys(value, sub, prefix=f"{prefix}{key}.")
        item = typing.get_args(sub)[0] if typing.get_origin(sub) is list else None
        if dataclasses.is_dataclass(item) and isinstance(value, list):  # a list of sections (data.sources)
            for i, entry in enumerate(value):
                _check_keys(entry, item, prefix=f"{prefix}{key}[{i}].")


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0].strip()
    key = getattr(e, "full_key", None)
    return f"config key '{key}': {msg}" if key else msg
