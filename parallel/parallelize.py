"""Spreads a model built on the meta device over the mesh. Later layers (TP, AC, compile) slot in
before FSDP, which must wrap last since it shards whatever parameters the others leave."""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims, fsdp_mesh
from trainer.config.schema import Config
from trainer.precision import Precision


def parallelize(model: nn.Module, *, dims: ParallelDims, mesh: DeviceMesh | None, cfg: Config, precision: Precision) -> None:
    if dims.fsdp_enabled:
        apply_fsdp(
            model, mesh=fsdp_mesh(mesh, dims), param_dtype=precision.param_dtype,
            reduce_dtype=precision.reduce_dtype, reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward,
            cpu_offload=cfg.parallel.cpu_offload,
        )
