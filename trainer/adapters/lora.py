"""LoRA and DoRA as a drop-in replacement for nn.Linear.

The frozen base weight keeps the parameter name `weight`, so the model's state-dict names do not change
and base checkpoints load as they are. The update is B @ A scaled by alpha / rank (alpha / sqrt(rank)
with rsLoRA). DoRA (Liu et al. 2024) rescales each output row of W + scale * B @ A to a learned magnitude
m: out = m / ||W + s B A||_row * (W x + s B A x), where the norm is detached (the paper's section 4.3)
so it is treated as a constant in backward.

The frozen base is a FrozenLinear (trainer/adapters/frozen.py), 4-bit for QLoRA / QDoRA: the forward
then uses the dequantized weight, and so does DoRA's norm.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adapters.frozen import FrozenLinear


class LoRALinear(FrozenLinear):
    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float, rslora: bool, dora: bool):
        if base.bias is not None:
            raise ValueError("adapters are only defined for bias-free linear layers (as in Llama)")
        super().__init__(base)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, rank, device=device))
        self.magnitude = nn.Parameter(torch.empty(self.out_features, device=device)) if dora else None
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

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
        return f"{kind}, rank={self.lora_a.shape[0]}, scale={self.scale:g}, {super().extra_repr()}"
