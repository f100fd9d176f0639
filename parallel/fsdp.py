"""FSDP2 (fully_shard): each transformer block is one unit, then the root (embeddings, norm, output)."""

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module, *, mesh: DeviceMesh | None, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
    reshard_after_forward: str, cpu_offload: bool, before_shard: Callable[[nn.Module, str], None] | None = None,
    expert_mesh: DeviceMesh | None = None, moe_mesh: DeviceMesh | None = None,
) -> None:
    """`before_shard(unit, unit_name)` runs on each unit just before it is sharded (adapter runs load,
    cast and quantize their frozen base there, since FSDP2 cannot re-shard a parameter whose type or
    dtype changes afterwards). `expert_mesh` (expert parallelism): each MoE layer's experts, already split
    over the ep ranks, are a unit of their own sharded over it. `moe_mesh` (tensor parallelism): each MoE
    layer is a unit of its own sharded over it (parallel/mesh.py says why). Without `mesh` (no data
    parallelism) only those units are sharded."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory needs an accelerator; on a CPU-only machine it must stay off.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    ranks = mesh.size() if mesh is not None else 1

    def shard(module: nn.Module, over: DeviceMesh, reshard: bool) -> None:
        fully_shard(module, mesh=over, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)

    blocks = list(model.layers.items())
    for i, (layer_id, block) in enumerate(blocks):
        if before_shard is not None:
            before_shard(block, f"layers.{layer_id}")
        if reshard_after_forward == "default":
            # The last block's parameters are needed again first thing in backward: keep them gathered.
            reshard = i < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        moe = getattr(block, "moe", None)
        for unit, over in ((getattr(moe, "experts", None), expert_mesh), (moe, moe_mesh)):
            if unit is not None and over is not None:
                shard(unit, over, reshard)
                _sum_then_divide(unit, over, ranks)
        if mesh is not None:
            shard(block, mesh, reshard)
    if before_shard is not None:
        before_shard(model, "")
    if mesh is not None:
        shard(model, mesh, reshard_after_forward == "always")


def _sum_then_divide(unit: nn.Module, mesh: DeviceMesh, ranks: int) -> None:
    """A unit sharded over other ranks than the rest of the model (`ranks` of them) still gets its gradient
    as the rest does: summed over its own ranks (all of whose tokens reached it), divided by `ranks`, the
    mean the loss's scale undoes (trainer.py). The reduction is a plain sum and a division after it:
    gloo has no pre-multiplied sum. Over one shard (nothing to reduce-scatter) torch 2.13 would divide
    twice with a plain sum, so there the factor alone is set."""
    unit.set_gradient_divide_factor(float(ranks))
    unit.set_force_sum_reduction_for_comms(mesh.size(mesh.ndim - 1) > 1)
