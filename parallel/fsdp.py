"""FSDP2 (fully_shard): each transformer block is one unit, then the root (embeddings, norm, output)."""

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module, *, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
    reshard_after_forward: str, cpu_offload: bool, before_shard: Callable[[nn.Module, str], None] | None = None,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """`before_shard(unit, unit_name)` runs on each unit just before it is sharded (adapter runs load,
    cast and quantize their frozen base there, since FSDP2 cannot re-shard a parameter whose type or
    dtype changes afterwards). `expert_mesh` (expert parallelism): each MoE layer's experts, already split
    over the ep ranks, are a unit of their own sharded over it."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory needs an accelerator; on a CPU-only machine it must stay off.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.items())
    for i, (layer_id, block) in enumerate(blocks):
        if before_shard is not None:
            before_shard(block, f"layers.{layer_id}")
        if reshard_after_forward == "default":
            # The last block's parameters are needed again first thing in backward: keep them gathered.
            reshard = i < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        if expert_mesh is not None and hasattr(block, "moe"):
            experts = block.moe.experts
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)
            # FSDP averages over the ranks it shards across, here ep times fewer than the data-parallel ranks
            # whose tokens reach these experts, while the loss is scaled for the mean over all of them
            # (trainer.py). The gradients are scaled down on their way back instead of by FSDP's divide
            # factor, which needs a reduction gloo lacks (PREMUL_SUM).
            experts.grad_scale = expert_mesh.size() / mesh.size()
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)
    if before_shard is not None:
        before_shard(model, "")
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard_after_forward == "always")
