"""LoRA and DoRA as a drop-in replacement for nn.Linear.

The frozen base weight keeps the parameter name `weight`, so the model's state-dict names do not change
and base checkpoints load as they are. The update is B @ A scaled by alpha / rank (alpha / sqrt(rank)
with rsLoRA). DoRA (Liu et al. 2024) rescales each output row of W + scale * B @ A to a learned magnitude
m: out = m / ||W + s B A||_row * (W x + s B A x), where the norm is detached (the paper's section 4.3)
so it is treated as a constant in backward.

With a 4-bit base (QLoRA / QDoRA) the frozen weight is quantized in place after it is loaded:
`weight` becomes a torchao NF4Tensor, or is replaced by `quantized` (bitsandbytes / HQQ codes); the
forward then uses the dequantized weight, and so does DoRA's norm.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.quantize import DequantLinear, PackedWeight, dequantize, quantize


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float, rslora: bool, dora: bool):
        super().__init__()
        if base.bias is not None:
            raise ValueError("adapters are only defined for bias-free linear layers (as in Llama)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=device)) if dora else None
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.quantized: PackedWeight | None = None
        # A converter that ran before this one may have given the base layer its own way to compute
        # x @ W.T (float8: fp8/conversion.py); the frozen product keeps it, the adapter's own stays plain.
        self.base_product = getattr(base, "linear_product", None)

    def quantize_base(self, kind: str, *, shards: int, hqq_group_size: int) -> None:
        """Replaces the loaded (whole, unsharded) base weight by its 4-bit form."""
        q = quantize(self.weight, kind, shards=shards, hqq_group_size=hqq_group_size)
        if isinstance(q, PackedWeight):
            del self.weight
            self.quantized = q
        else:  # torchao NF4: a tensor subclass that stays the `weight` parameter
            self.weight = nn.Parameter(q, requires_grad=False)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as a float tensor (dequantized when 4-bit)."""
        return self.quantized.dequantize() if self.quantized is not None else dequantize(self.weight)

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return DequantLinear.apply(x, self.quantized)
        if self.base_product is not None:
            return self.base_product(x, self.weight)
        # torchao's NF4Tensor handles F.linear itself (dequantizing again in backward).
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_linear(x)
        dropped = self.dropout(x)
        update = F.linear(F.linear(dropped, self.lora_a), self.lora_b) * self.scale
        if self.magnitude is None:
            return base + update
        scale = (self.magnitude / self.weight_norm().detach()).view(*([1] * (x.ndim - 1)), -1)
        # With dropout, DoRA rescales the base output of the dropped input (as peft does).
        base_dropped = base if isinstance(self.dropout, nn.Identity) else self.base_linear(dropped)
        return base + (scale - 1) * base_dropped + scale * update

    def weight_norm(self) -> torch.Tensor:
        """||W + scale * B @ A|| per output row."""
        merged = self.base_weight() + self.scale * (self.lora_b @ self.lora_a)
        return torch.linalg.norm(merged, dim=1)

    def extra_repr(self) -> str:
        kind = "dora" if self.magnitude is not None else "lora"
        base = type(self.quantized).__name__ if self.quantized is not None else type(self.weight.data).__name__
        if self.base_product is not None:
            base += f" computed by {self.base_product}"
        return f"{self.in_features}, {self.out_features}, {kind}, rank={self.lora_a.shape[0]}, scale={self.scale:g}, base={base}"
