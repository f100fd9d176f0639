"""torch.compile per transformer block: blocks are identical, so one compiled graph serves them all."""

from torch import nn


def apply_compile(model: nn.Module) -> None:
    for block in model.layers.values():
        # In place: unlike torch.compile(block), this adds no `_orig_mod.` to parameter names.
        block.compile(fullgraph=True)
