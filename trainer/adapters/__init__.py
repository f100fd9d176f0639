"""Adapters: the model transform that turns full finetuning into LoRA / DoRA.

Applied on the meta device, before parallelization: the chosen nn.Linear layers are replaced in place
by LoRALinear (a mixture of experts' stacked experts, by LoRAExperts), every base parameter is frozen, and
only adapter parameters train (so the optimizer holds only them). Adapter weights are initialised after
the base weights are in place, since DoRA's magnitude starts as the norm of the base rows.
"""

import math
import re
import zlib

import torch
from torch import nn

from models import family_of
from parallel.placement import copy_full_into, gather_full
from models.common.moe import GroupedExperts
from trainer.adapters.experts import LoRAExperts
from trainer.adapters.lora import LoRALinear
from trainer.config import ConfigError
from trainer.config.schema import AdaptersConfig

def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    short_names = family_of(model.args).adapter_targets
    patterns = []
    for target in targets:
        try:
            patterns.append(re.compile(short_names.get(target, target)))
        except re.error as e:
            raise ConfigError(f"adapters.targets: {target!r} is neither a short name ({', '.join(short_names)}) nor a valid regular expression ({e})") from None
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, GroupedExperts)) and any(p.fullmatch(n) for p in patterns)]
    if not names:
        raise ConfigError(f"adapters.targets={targets} matches no linear layer (or experts) of the model (short names: "
                          f"{', '.join(short_names)})")
    return names


def apply_adapters(model: nn.Module, cfg: AdaptersConfig) -> None:
    if cfg.kind == "none":
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for name in target_names(model, cfg.targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base, dora = getattr(parent, child), cfg.kind == "dora"
        if isinstance(base, GroupedExperts):
            lora = LoRAExperts(base, rank=cfg.rank, alpha=cfg.alpha, rslora=cfg.rslora, dora=dora)
        else:
            lora = LoRALinear(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, dora=dora)
        setattr(parent, child, lora)


def _kaiming(param: torch.Tensor, name: str, seed: int) -> None:
    """Uniform within 1/sqrt(in) (in: the last dimension; as peft), drawn whole from a generator seeded by
    the parameter's name in the whole model, so every layout starts from the same adapters."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1 / math.sqrt(param.shape[-1])
    copy_full_into(param, torch.empty(param.shape).uniform_(-bound, bound, generator=generator))


@torch.no_grad()
def init_adapter(module: LoRALinear | LoRAExperts, name: str, seed: int) -> None:
    """A ~ kaiming-uniform, B = 0 (training starts from the base model), DoRA magnitude = ||W||_row of
    the (dequantized) base."""
    if isinstance(module, LoRAExperts):
        for which in ("gate_up", "down"):
            _kaiming(getattr(module, f"lora_a_{which}"), f"{name}.lora_a_{which}", seed)
            b = getattr(module, f"lora_b_{which}")
            copy_full_into(b, torch.zeros(b.shape))
        if module.dora:
            w1, w2, w3 = (gather_full(w).float() for w in (module.w1, module.w2, module.w3))
            copy_full_into(module.magnitude_gate_up, torch.linalg.norm(torch.cat([w1, w3], dim=1), dim=2))
            copy_full_into(module.magnitude_down, torch.linalg.norm(w2, dim=2))
        return
    _kaiming(module.lora_a, f"{name}.lora_a", seed)
    copy_full_into(module.lora_b, torch.zeros(module.lora_b.shape))
    if module.magnitude is not None:
        copy_full_into(module.magnitude, torch.linalg.norm(gather_full(module.base_weight()).float(), dim=1))


def finish_unit(pieces: list[tuple[str, nn.Module]], *, cfg: AdaptersConfig, shards: int, seed: int,
                frozen_dtype: torch.dtype) -> None:
    """After a unit's base weights are in place: store the frozen ones in `frozen_dtype` (the compute
    dtype: they never see an optimizer, so fp32 copies would only cost memory), quantize the adapted
    ones (QLoRA / QDoRA), initialise the adapters. Only one block is ever in high precision at once."""
    for piece_name, piece in pieces:
        for module in piece.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.requires_grad and param.dtype != frozen_dtype:
                    setattr(module, name, nn.Parameter(param.detach().to(frozen_dtype), requires_grad=False))
        for name, module in piece.named_modules(prefix=piece_name):
            if isinstance(module, LoRALinear) and cfg.quantize_base != "none":  # experts never are (refused)
                module.quantize_base(cfg.quantize_base, shards=shards, hqq_group_size=cfg.hqq_group_size)
            if isinstance(module, (LoRALinear, LoRAExperts)):
                init_adapter(module, name, seed)
