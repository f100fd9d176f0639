"""Filling a model's parameters (plain tensors or DTensor shards) from a weight source, by name."""

import torch
from torch import nn

from parallel.placement import copy_full_into
from trainer.weights.errors import CheckpointError


@torch.no_grad()
def fill_from(model: nn.Module, source, prefix: str = "") -> None:
    """Copies each base parameter of `model` from `source.get(name)`, a whole tensor named as in the
    whole model (`prefix` + the name in `model`). Adapter parameters are not a checkpoint's: they are
    initialised separately."""
    for name, param in model.named_parameters():
        name = prefix + name
        if name not in source.names:
            continue
        try:
            copy_full_into(param, source.get(name))
        except ValueError as e:
            raise CheckpointError(f"{source.label(name)}: {e}") from None
