"""Loading a Hugging Face checkpoint directory of any registered family (config.json + one or sharded
safetensors)."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from models import FAMILIES, DecoderArgs, family_for_hf, family_of
from trainer.weights.errors import CheckpointError


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_args(path: Path) -> DecoderArgs:
    """The shape of an HF checkpoint, translated by the family its config's model_type names."""
    config_file = path / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: cannot read it as JSON ({e})") from None
    model_type = cfg.get("model_type") or "llama"
    family = family_for_hf(model_type)
    if family is None:
        known = ", ".join(f.hf.model_type for f in FAMILIES.values())
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not one we train ({known})")
    try:
        return family.hf.args_from_config(cfg)
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def _quantization(path: Path):
    """(format, group size) of a quantized export of ours, None for a plain checkpoint."""
    config = json.loads((path / "config.json").read_text()).get("quantization_config")
    if config is None:
        return None
    from trainer.qat.export import format_of

    try:
        return format_of(config)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (only safetensors weights are loaded, never pickles)")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the safetensors index but missing")
    return files


@dataclass(frozen=True)
class _QuantizedLayer:
    """A linear layer (or one expert's projection) that a quantized export stores as codes and scales,
    read back dequantized: {suffix: file} of its tensors."""

    module: str
    files: dict


class HFWeights:
    """The tensors of a Hugging Face checkpoint by our parameter names, read one at a time (safetensors
    maps the files, so nothing else is read). Names are checked against the model when opened."""

    def __init__(self, path: Path, args: DecoderArgs, shapes: dict[str, torch.Size]):
        self.path, self.where = path, {}
        known = self.names = set(shapes)
        hf = family_of(args).hf
        self.joined = hf.joined
        # A quantized export (trainer/qat/export.py): its linear layers' weights are read dequantized, and
        # `served` says which layers they are and how the served model rounds them.
        self.format, self.group_size, self.served = _quantization(path), 0, []
        files: dict[str, Path] = {}  # every tensor of the checkpoint -> its file
        for file in _safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    files.update(dict.fromkeys(handle.keys(), file))
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        stored = {}  # module -> {suffix: file} of a quantized layer
        if self.format is not None:
            self.format, self.group_size = self.format
            quantized = {k.removesuffix(".weight_scale") for k in files if k.endswith(".weight_scale")}
            for hf_name, file in files.items():
                module, _, suffix = hf_name.rpartition(".")
                if module in quantized:
                    stored.setdefault(module, {})[suffix] = file
            files = {k: f for k, f in files.items() if k.rpartition(".")[0] not in stored}
            for module, parts in stored.items():
                layer = _QuantizedLayer(module, parts)
                if hf.joined is not None and hf.joined.claims(f"{module}.weight"):
                    files[f"{module}.weight"] = layer  # one expert's projection: joined with the others below
                    continue
                name = hf.from_hf(f"{module}.weight")
                if name not in known:
                    raise CheckpointError(f"{path}: quantized layer {module} has no place in this model")
                self.where[name] = (layer, f"{module}.weight")
                self.served.append(name.removesuffix(".weight"))
        own_head = None
        for hf_name, file in files.items():
            if hf.joined is not None and hf.joined.claims(hf_name):
                continue  # a piece of one of ours: assembled below
            name = hf.from_hf(hf_name)
            if name == "output.weight" and args.tie_embeddings:
                own_head = (file, hf_name)  # some tied checkpoints also store it: the same tensor, or else
                continue
            if name is None:
                continue
            if name not in known:
                raise CheckpointError(f"{file}: tensor {hf_name} has no place in this model")
            self.where[name] = (file, hf_name)
        if hf.joined is not None:
            self._find_joined(hf.joined, shapes, files)
            # Stacked experts whose pieces are stored quantized are served rounding as well.
            self.served += sorted({name.rpartition(".")[0] for name, where in self.where.items()
                                   if isinstance(where, list) and isinstance(where[0][0], _QuantizedLayer)})
        missing = sorted(known - set(self.where))
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, first {missing[0]}")
        if own_head is not None:
            self._check_tied_head(*own_head)

    def _find_joined(self, joined, shapes: dict[str, torch.Size], files: dict[str, Path]) -> None:
        """Our tensors that the checkpoint holds in pieces (one per expert, or fused with another)."""
        used = set()
        for name, shape in shapes.items():
            parts = joined.sources(name, shape, files)
            if parts is None:
                continue
            absent = [p for p in parts if p not in files]
            if absent:
                raise CheckpointError(f"{self.path}: checkpoint lacks tensor {absent[0]} (part of our {name}; "
                                      f"{len(absent)} of its {len(parts)} parts are missing)")
            self.where[name] = [(files[p], p) for p in parts]
            used.update(parts)
        extra = sorted(n for n in files if joined.claims(n) and n not in used)
        if extra:
            raise CheckpointError(f"{files[extra[0]]}: tensor {extra[0]} has no place in this model (more experts "
                                  f"than the model's? {len(extra)} such tensors)")

    def _check_tied_head(self, file: Path, hf_name: str) -> None:
        """Tied embeddings beside a head of their own that differs: tying would drop a trained head."""
        with safe_open(str(file), framework="pt") as handle:
            head = handle.get_tensor(hf_name)
        if not torch.equal(head, self.get("tok_embeddings.weight")):
            raise CheckpointError(
                f"{self.path}: config.json has tie_word_embeddings=true, but {file.name} holds its own {hf_name}, which "
                f"differs from the embedding: tying would drop it. Set tie_word_embeddings to false in config.json to keep "
                f"the head, or remove {hf_name} to tie them")

    def label(self, name: str) -> str:
        where = self.where[name]
        if isinstance(where[0], _QuantizedLayer):
            return f"{self.path}: quantized layer {where[0].module}"
        if isinstance(where, list):
            first = where[0][0]
            source = f"{self.path} (quantized)" if isinstance(first, _QuantizedLayer) else first
            return f"{source}: tensors {where[0][1]} .. {where[-1][1]}"
        return f"{where[0]}: tensor {where[1]}"

    def get(self, name: str) -> torch.Tensor:
        where = self.where[name]
        if isinstance(where, list):
            return self.joined.join(name, [self._read(file, hf_name) for file, hf_name in where])
        return self._read(*where)

    def _read(self, file: "Path | _QuantizedLayer", hf_name: str) -> torch.Tensor:
        if isinstance(file, _QuantizedLayer):
            from trainer.qat.export import dequantize_stored

            tensors = {suffix: self._read(f, f"{file.module}.{suffix}") for suffix, f in file.files.items()}
            return dequantize_stored(tensors, self.format, self.group_size)
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(hf_name)

