"""Model converters by name: the registry, the ordered list a config states or implies, and the checks of
that list. The protocol is in base.py; each converter is a module of its own here, over mechanics that live
elsewhere (fp8/, trainer/adapters/)."""

from trainer.config import Config, ConfigError
from trainer.converters.adapters import AdapterConverter
from trainer.converters.base import ConverterInfo, MemoryEstimate, MemoryShape, ModelConverter
from trainer.converters.float8 import Float8Converter
from trainer.converters.qat import QATConverter

# name -> converter, in the order they apply when the config implies the list.
REGISTRY: dict[str, type[ModelConverter]] = {c.name: c for c in (Float8Converter, QATConverter, AdapterConverter)}
# What turns each on, for the messages.
_SWITCHES = {"float8": "fp8.enabled=true", "qat": "qat.scheme", "adapters": "adapters.kind=lora or dora"}


def build_converters(cfg: Config) -> list[ModelConverter]:
    """The converters the config turns on, in the order model.converters states (checked), or in the
    registry's order when it states none."""
    enabled = {name: c for name, kind in REGISTRY.items() if (c := kind.from_config(cfg)) is not None}
    stated = list(cfg.model.converters)
    if not stated:
        return list(enabled.values())
    for name in stated:
        if name not in REGISTRY:
            raise ConfigError(f"model.converters: {name!r} is not a converter (one of: {', '.join(REGISTRY)})")
        if name not in enabled:
            raise ConfigError(f"model.converters names {name}, which its settings leave off: set {_SWITCHES[name]}, or "
                              f"drop it from model.converters")
    if len(set(stated)) != len(stated):
        raise ConfigError(f"model.converters={stated} names a converter twice")
    missing = [name for name in enabled if name not in stated]
    if missing:
        raise ConfigError(f"model.converters={stated} leaves out {missing[0]}, which its settings turn on: add it, or "
                          f"leave model.converters empty to apply every converter that is on")
    for i, name in enumerate(stated):
        late = [before for before in REGISTRY[name].after if before in stated[i + 1:]]
        if late:
            raise ConfigError(f"model.converters={stated}: {late[0]} must come before {name} ({name} wraps the layers "
                              f"{late[0]} converts)")
    return [enabled[name] for name in stated]


__all__ = ["REGISTRY", "ConverterInfo", "MemoryEstimate", "MemoryShape", "ModelConverter", "build_converters"]
