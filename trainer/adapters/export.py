"""Adapter outputs: the adapter alone in PEFT's format, and a merged model.

PEFT's format: adapter_config.json + adapter_model.safetensors with keys
base_model.model.<HF module>.lora_A.weight / lora_B.weight / lora_magnitude_vector, which
peft.PeftModel.from_pretrained loads onto the Hugging Face export of the base model; adapters over a
mixture's experts as peft's `target_parameters` (trainer/adapters/experts.py: peft_tensors).
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from models import family_of
from parallel.placement import gather_full
from trainer.adapters.experts import LoRAExperts, peft_tensors
from trainer.adapters.lora import LoRALinear
from trainer.config.schema import AdaptersConfig
from trainer.weights.files import readable


def _hf_module(model: nn.Module, name: str) -> str:
    return family_of(model.args).hf.to_hf(f"{name}.weight").removesuffix(".weight")


@torch.no_grad()
def merged_weight(module: LoRALinear) -> torch.Tensor:
    """The (dequantized) base weight with the adapter folded in: no extra cost at inference (gathers
    whole tensors)."""
    weight = gather_full(module.base_weight()).float()
    delta = module.scale * (gather_full(module.lora_b).float() @ gather_full(module.lora_a).float())
    merged = weight + delta
    if module.magnitude is not None:
        merged = gather_full(module.magnitude).float().unsqueeze(1) * merged / torch.linalg.norm(merged, dim=1, keepdim=True)
    return merged


def _named_weights(model: nn.Module, adapted_weight, adapted_experts) -> Iterator[tuple[str, torch.Tensor]]:
    adapters = {name: module for name, module in model.named_modules() if isinstance(module, (LoRALinear, LoRAExperts))}
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] not in adapters and name.removesuffix(".quantized.codes") not in adapters:
            yield name, gather_full(param)
    for name, module in adapters.items():
        if isinstance(module, LoRAExperts):
            yield from ((f"{name}.{w}", tensor) for w, tensor in adapted_experts(module).items())
        else:
            yield f"{name}.weight", adapted_weight(module)


def merged_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of every base parameter, adapters merged into their layers' weights."""
    return _named_weights(model, merged_weight, LoRAExperts.merged)


def base_named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of the frozen base alone, dequantized where it is 4-bit."""
    return _named_weights(model, lambda module: gather_full(module.base_weight()).float(),
                          lambda module: {w: gather_full(getattr(module, w)).float() for w in ("w1", "w2", "w3")})


@torch.no_grad()
def export_peft(model: nn.Module, cfg: AdaptersConfig, out_dir: Path, base_model: str | None = None) -> None:
    """`base_model`: where the base it belongs on is (adapter_config.json's base_model_name_or_path)."""
    tensors, targets, target_parameters = {}, [], []
    for name, module in model.named_modules():
        if isinstance(module, LoRAExperts):
            hf = family_of(model.args).hf.joined.hf_module(name)
            target_parameters += [f"{hf}.gate_up_proj", f"{hf}.down_proj"]  # in this order: see peft_tensors
            tensors.update(peft_tensors(module, hf))
            continue
        if not isinstance(module, LoRALinear):
            continue
        hf = _hf_module(model, name)
        targets.append(hf)
        prefix = f"base_model.model.{hf}"
        tensors[f"{prefix}.lora_A.weight"] = gather_full(module.lora_a)
        tensors[f"{prefix}.lora_B.weight"] = gather_full(module.lora_b)
        if module.magnitude is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = gather_full(module.magnitude)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"))
    readable(out_dir / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "use_dora": cfg.kind == "dora", "use_rslora": cfg.rslora, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
        "target_modules": sorted(targets),  # exact module names: peft matches them as name suffixes
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
