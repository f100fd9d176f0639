"""Tensor + sequence parallelism: a model family's DTensor plan applied to the root and to each block."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module


@dataclass(frozen=True)
class TPPlan:
    """Where each module goes: `top` for the root's own modules (those a pipeline stage lacks are left
    out by whoever builds it), `block(block)` for each transformer block. The model family writes it;
    converters pick the styles of the modules they created."""

    top: dict[str, ParallelStyle]
    block: Callable[[nn.Module], dict[str, ParallelStyle]]


def apply_tp(model: nn.Module, *, tp_mesh: DeviceMesh, plan: TPPlan, async_tp: bool) -> None:
    # SequenceParallel re-creates the norm weights as new Parameters that require grad: remember what
    # was frozen (adapter runs) and freeze it again afterwards.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan.top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan.block(block))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)

    if async_tp:
        # Lets compiled blocks fuse the sequence all-gather / reduce-scatter into the matmuls.
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        import torch._inductor.config as inductor_config

        inductor_config._micro_pipeline_tp = True
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
