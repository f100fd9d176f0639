"""Tensor + sequence parallelism: a model family's DTensor plan applied to the root and to each block,
with the styles converters give the linear layers they created."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)


def _none(*args, **kwargs) -> None:
    return None


@dataclass(frozen=True)
class LinearStyles:
    """How the modules a converter created split: each function returns a style for a module of its own
    kind and None for any other, so the styles of several converters compose (float8's for its float8
    linears, the adapters' for their layers); what none claims gets the plain style.

    colwise(module, **kwargs) / rowwise(module, **kwargs): for one linear layer. prepare_input(module,
    consumers, **kwargs): for the block's attention or MLP module, whose input goes to the linear layers
    named in `consumers` (float8 casts it once, before the sequence all-gather)."""

    colwise: Callable[..., ParallelStyle | None] = _none
    rowwise: Callable[..., ParallelStyle | None] = _none
    prepare_input: Callable[..., ParallelStyle | None] = _none

    @staticmethod
    def combine(styles: "list[LinearStyles]") -> "LinearStyles":
        """The first style that claims a module wins; the plain style takes what none claims."""
        def first(kind: str, plain: Callable[..., ParallelStyle]):
            def pick(module: nn.Module, *args, **kwargs) -> ParallelStyle:
                chosen = (getattr(s, kind)(module, *args, **kwargs) for s in styles)
                return next((c for c in chosen if c is not None), None) or plain(**kwargs)
            return pick

        return LinearStyles(colwise=first("colwise", ColwiseParallel), rowwise=first("rowwise", RowwiseParallel),
                            prepare_input=first("prepare_input", PrepareModuleInput))


@dataclass(frozen=True)
class TPPlan:
    """Where each module goes: `top` for the root's own modules (those a pipeline stage lacks are left
    out by whoever builds it), `block(block)` for each transformer block. The model family writes it;
    converters pick the styles of the modules they created."""

    top: dict[str, ParallelStyle]
    block: Callable[[nn.Module], dict[str, ParallelStyle]]


def apply_tp(model: nn.Module, *, tp_mesh: DeviceMesh, plan: TPPlan) -> None:
    # SequenceParallel re-creates the norm weights as new Parameters that require grad: remember what
    # was frozen (adapter runs) and freeze it again afterwards.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan.top)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, plan.block(block))
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
