"""A PEFT LoRA / DoRA adapter directory (ours from export.peft, or peft's own) folded into a whole model of
its base, for sampling: W + s·B·A, and for DoRA m · (W + s·B·A) / ‖W + s·B·A‖ row by row, as peft
merges them (s = alpha / r, or alpha / √r with rsLoRA)."""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import Decoder, family_of
from trainer.errors import CheckpointError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def peft_base(path: Path) -> Path:
    """Where the adapter's base is: its config's base_model_name_or_path as written (our exports write
    it absolute), else beside the adapter (export/peft -> export/base)."""
    config = json.loads((path / CONFIG).read_text())
    named = config.get("base_model_name_or_path")
    for candidate in ([Path(named), path.parent / Path(named).name] if named else []) + [path.parent / "base"]:
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: its base ({named or 'not named in ' + CONFIG}) is not on this machine and "
                          f"there is no base/ beside it: give the base's Hugging Face directory as the path instead")


@torch.no_grad()
def merge_peft(model: Decoder, path: Path) -> None:
    config = json.loads((path / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA (LoRA and DoRA are what we read)")
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS} (PEFT's .bin adapters are pickles, which we do not load)")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(path / WEIGHTS)
    hf, params = family_of(model.args).hf, dict(model.named_parameters())
    merged = 0
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        ours = hf.from_hf(f"{module}.weight")
        if ours not in params:
            raise CheckpointError(f"{path}: adapter for {module}, which the base model has no linear layer of")
        prefix = key.removesuffix(".lora_A.weight")
        weight = params[ours]
        a, b = tensors[key].float(), tensors[f"{prefix}.lora_B.weight"].float()
        new = weight.float() + scale * (b @ a).to(weight.device)
        magnitude = tensors.get(f"{prefix}.lora_magnitude_vector")
        if magnitude is not None:
            new = magnitude.float().to(weight.device).unsqueeze(1) * new / torch.linalg.norm(new, dim=1, keepdim=True)
        weight.copy_(new.to(weight.dtype))
        merged += 1
    if merged == 0:
        raise CheckpointError(f"{path}: {WEIGHTS} holds no lora_A / lora_B pairs")
