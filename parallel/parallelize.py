"""Spreads one model (or one pipeline stage) over the mesh, in the order that matters:

TP first (it turns parameters into DTensors that FSDP must see); EP (the experts sharded over their
ranks, DTensors too); CP (the attention over sequence slices, no parameters touched); AC next (wrapping the TP'd block);
compile after AC (so the compiled graph contains the recomputation); activation offloading around
what AC and compile made of the block (so it moves what they save); FSDP last (it shards whatever
parameters the others leave and hooks around the compiled, checkpointed blocks).
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.ac import apply_ac
from parallel.activation_offload import apply_activation_offload
from parallel.compile import apply_compile
from parallel.cp import apply_cp
from parallel.ep import apply_ep
from parallel.fsdp import apply_fsdp
from parallel.tp import TPPlan, apply_tp


def parallelize(
    model: nn.Module, *, tp_mesh: DeviceMesh | None, tp_plan: TPPlan | None, ac_mode: str, ac_every: int,
    compile: bool, fsdp_mesh: DeviceMesh | None, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
    reshard_after_forward: str, cpu_offload: bool, materialize: Callable[[nn.Module, str], None] | None = None,
    cp_mesh: DeviceMesh | None = None, ep_mesh: DeviceMesh | None = None, expert_fsdp_mesh: DeviceMesh | None = None,
    moe_fsdp_mesh: DeviceMesh | None = None, ac_offload: bool = False,
) -> None:
    """`tp_plan` (the model family's, with the styles of the modules converters created) is needed with a
    tp_mesh. `materialize(unit, unit_name)`, if given, brings each block and then the root's own modules
    off the meta device, each just before FSDP shards it (a model without it is materialized afterwards).
    With an ep_mesh, FSDP shards the experts over expert_fsdp_mesh; with moe_fsdp_mesh (tensor parallelism
    over a mixture of experts) each MoE layer over it. ac_offload moves the activations blocks save for
    backward to host memory."""
    if tp_mesh is not None:
        apply_tp(model, tp_mesh=tp_mesh, plan=tp_plan)
    if ep_mesh is not None:
        apply_ep(model, ep_mesh)
    if cp_mesh is not None:
        apply_cp(model, cp_mesh)
    apply_ac(model, mode=ac_mode, every=ac_every)
    if compile:
        apply_compile(model)
    if ac_offload:
        apply_activation_offload(model)
    if fsdp_mesh is not None or moe_fsdp_mesh is not None:
        apply_fsdp(
            model, mesh=fsdp_mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
            reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload, before_shard=materialize,
            expert_mesh=expert_fsdp_mesh, moe_mesh=moe_fsdp_mesh,
        )
    elif materialize is not None:
        materialize_units(model, materialize)


def materialize_units(model: nn.Module, materialize: Callable[[nn.Module, str], None]) -> None:
    """Without FSDP: each block, then the root's own modules, in the order FSDP would shard them."""
    for layer_id, block in model.layers.items():
        materialize(block, f"layers.{layer_id}")
    materialize(model, "")
