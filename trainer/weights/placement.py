"""Copying whole (unsharded) tensors into parameters that may be DTensor shards, and back."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.weights.errors import CheckpointError


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Fills `param` (a plain tensor or a DTensor) from the whole tensor `full`, which every rank holds."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not fit parameter of shape {tuple(param.shape)}")
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already has the whole tensor, so slicing needs no communication.
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def gather_full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for DTensors: all ranks must call it)."""
    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


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
