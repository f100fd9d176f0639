"""How a linear layer multiplies its input by its weight, where that is not F.linear: the one contract
between converters that replace linear layers.

A converter that swaps nn.Linear for a layer computing x @ W.T another way (float8) records the way with
set_product; a layer that later replaces it and keeps its weight frozen (the adapters' FrozenLinear) asks
product_of and computes its frozen product the same way.
"""

from collections.abc import Callable

import torch
from torch import nn

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight) -> x @ weight.T
_ATTRIBUTE = "linear_product"


def set_product(layer: nn.Module, product: Product | None) -> None:
    setattr(layer, _ATTRIBUTE, product)


def product_of(layer: nn.Module) -> Product | None:
    """The layer's own product, or None for F.linear."""
    return getattr(layer, _ATTRIBUTE, None)
