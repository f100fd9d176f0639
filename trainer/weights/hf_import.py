"""Loading a Hugging Face Llama or Qwen3 checkpoint directory (config.json + one or sharded safetensors)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trainer.model.args import ModelArgs, RopeScaling
from trainer.model.build import param_shapes
from trainer.model.llama import Transformer
from trainer.model.family import FAMILIES, family_for_hf, family_of
from trainer.weights.errors import CheckpointError
from trainer.weights.placement import fill_from


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_args(path: Path) -> ModelArgs:
    config_file = path / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: cannot read it as JSON ({e})") from None
    arch = cfg.get("model_type") or "llama"
    family = family_for_hf(arch)
    if family is None:
        known = ", ".join(f.hf_model_type for f in FAMILIES.values())
        raise CheckpointError(f"{config_file}: model_type {arch!r} is not one we train ({known})")
    if cfg.get("use_sliding_window"):
        raise CheckpointError(f"{config_file}: sliding-window attention is not supported (use_sliding_window)")
    try:
        # transformers >= 5 keeps theta and scaling in rope_parameters; older files use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_seq_len=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise CheckpointError(f"{config_file}: rope type {rope_type!r} is not supported (default, llama3)")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        try:
            extra = family.hf_extra_args(cfg, head_dim)
        except ValueError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError(f"{config_file}: attention/MLP biases are not part of the Llama shape we train")
        return ModelArgs(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            ffn_hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            **extra,
        )
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing field {e}") from None


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


class HFWeights:
    """The tensors of a Hugging Face checkpoint by our parameter names, read one at a time (safetensors
    maps the files, so nothing else is read). Names are checked against the model when opened."""

    def __init__(self, path: Path, args: ModelArgs):
        self.path, self.where = path, {}
        known = self.names = set(param_shapes(args))
        from_hf = family_of(args).from_hf
        for file in _safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    hf_names = list(handle.keys())
            except Exception as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
            for hf_name in hf_names:
                name = from_hf(hf_name)
                if name is None or (name == "output.weight" and args.tie_embeddings):
                    continue  # some tied checkpoints also store lm_head; the embedding is the one we keep
                if name not in known:
                    raise CheckpointError(f"{file}: tensor {hf_name} has no place in this model")
                self.where[name] = (file, hf_name)
        missing = sorted(known - set(self.where))
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, first {missing[0]}")

    def label(self, name: str) -> str:
        file, hf_name = self.where[name]
        return f"{file}: tensor {hf_name}"

    def get(self, name: str) -> torch.Tensor:
        file, hf_name = self.where[name]
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(hf_name)


def load_hf_weights(model: Transformer, path: Path) -> None:
    """Fills every parameter of `model` (possibly sharded, possibly one pipeline stage) from the
    checkpoint, one tensor at a time."""
    fill_from(model, HFWeights(path, model.args))
