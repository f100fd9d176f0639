"""Copying whole (unsharded) tensors into parameters that may be DTensor shards, and back."""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


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
