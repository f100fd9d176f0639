"""torch.compile per transformer block: blocks are identical, so one compiled graph serves them all."""

from torch import nn


def apply_compile(model: nn.Module) -> None:
    for block in model.layers.values():
        # In place: unlike torch.compile(block), this adds no `_orig_mod.` to parameter names. A block with
        # experts may break its graph where the experts run eagerly (models/common/moe.py: the grouped
        # matmul outside bfloat16, the all-to-all of expert parallelism); every other block is one graph.
        block.compile(fullgraph=not hasattr(block, "moe"))
