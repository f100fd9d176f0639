"""Spreads one model (or one pipeline stage) over the mesh, in the order that matters:

TP first (it turns parameters into DTensors that FSDP must see); AC next (wrapping the TP'd block);
compile after AC (so the compiled graph contains the recomputation); FSDP last (it shards whatever
parameters the others leave and hooks around the compiled, checkpointed blocks).
"""

from collections.abc import Callable

from torch import nn

from parallel.ac import apply_ac
from parallel.compile import apply_compile
from parallel.fsdp import apply_fsdp
from parallel.mesh import Meshes
from parallel.tp import apply_tp
from trainer.config.schema import Config
from trainer.precision import Precision


def parallelize(
    model: nn.Module, *, meshes: Meshes | None, cfg: Config, precision: Precision,
    materialize: Callable[[nn.Module, str], None] | None = None,
) -> None:
    """`materialize(unit, unit_name)`, if given, brings each block and then the root's own modules off
    the meta device, each just before FSDP shards it (a model without it is materialized afterwards)."""
    if meshes is not None and meshes.tp is not None:
        apply_tp(model, tp_mesh=meshes.tp, loss_parallel=cfg.parallel.loss_parallel, async_tp=cfg.parallel.async_tp)
    apply_ac(model, mode=cfg.activation_checkpoint.mode, every=cfg.activation_checkpoint.every)
    if cfg.compile.enabled:
        apply_compile(model)
    if meshes is not None and meshes.fsdp is not None:
        apply_fsdp(
            model, mesh=meshes.fsdp, param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype,
            reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward, cpu_offload=cfg.parallel.cpu_offload,
            before_shard=materialize,
        )
    elif materialize is not None:
        for layer_id, block in model.layers.items():
            materialize(block, f"layers.{layer_id}")
        materialize(model, "")
