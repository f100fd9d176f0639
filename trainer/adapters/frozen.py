"""A frozen linear layer whose weight may be 4-bit: the base under LoRA / DoRA, and every linear layer of
a 4-bit distillation teacher.

The weight keeps the parameter name `weight`, so state-dict names do not change and checkpoints load as
they are. Quantized in place after it is loaded: `weight` becomes a torchao NF4Tensor, or is replaced by
`quantized` (bitsandbytes / HQQ codes); the forward then multiplies by the dequantized weight, which is
never kept.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.common.linear import product_of, set_product
from trainer.adapters.quantize import DequantLinear, PackedWeight, dequantize, quantize


class FrozenLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        if base.bias is not None:
            raise ValueError("frozen 4-bit layers are only defined for bias-free linear layers (as in Llama)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.quantized: PackedWeight | None = None
        # A converter that ran before this one may have given the base layer its own way to compute
        # x @ W.T (float8: fp8/conversion.py); the frozen product keeps it.
        set_product(self, product_of(base))

    def quantize_base(self, kind: str, *, shards: int, hqq_group_size: int) -> None:
        """Replaces the loaded (whole, unsharded) weight by its 4-bit form."""
        q = quantize(self.weight, kind, shards=shards, hqq_group_size=hqq_group_size)
        if isinstance(q, PackedWeight):
            del self.weight
            self.quantized = q
        else:  # torchao NF4: a tensor subclass that stays the `weight` parameter
            self.weight = nn.Parameter(q, requires_grad=False)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a float tensor (dequantized when 4-bit)."""
        return self.quantized.dequantize() if self.quantized is not None else dequantize(self.weight)

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return DequantLinear.apply(x, self.quantized)
        product = product_of(self)
        if product is not None:
            return product(x, self.weight)
        # torchao's NF4Tensor handles F.linear itself (dequantizing again in backward).
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_linear(x)

    def extra_repr(self) -> str:
        base = type(self.quantized).__name__ if self.quantized is not None else type(self.weight.data).__name__
        if product_of(self) is not None:
            base += f" computed by {product_of(self)}"
        return f"{self.in_features}, {self.out_features}, base={base}"
