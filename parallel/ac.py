"""Activation checkpointing: trade recomputation in backward for activation memory.

The block's forward is wrapped in place (no wrapper module), so parameter and state-dict names stay
those of the plain model: checkpoints and seeded initialisation do not depend on the AC mode.
"""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# Outputs worth keeping: the expensive ops (matmuls, the experts' grouped matmuls, attention), the TP
# reduce-scatter and expert parallelism's all-to-all, which would otherwise be communicated again during
# recomputation. Everything else (norms, SiLU, RoPE, routing) is cheap.
_SAVE_OPS = {
    _aten.mm.default,
    _aten._grouped_mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional_autograd.all_to_all_single.default,
    torch.ops.higher_order.flex_attention,  # document attention on CUDA with compile
}


def _op_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_forward(block: nn.Module, context_fn=None) -> None:
    inner = block.forward
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}

    def forward(*args, **block_kwargs):  # keywords: a block's cache, start and attention mask
        # preserve_rng_state=False: the blocks use no randomness, and saving RNG state costs a sync on CUDA.
        return checkpoint(inner, *args, **block_kwargs, use_reentrant=False, preserve_rng_state=False, **kwargs)

    block.forward = forward


def apply_ac(model: nn.Module, *, mode: str, every: int) -> None:
    if mode == "none":
        return
    for layer_id, block in model.layers.items():
        if mode == "full":
            _checkpoint_forward(block)
        elif mode == "selective_layer":
            # Counted by the layer's id, not its position in a pipeline stage, so the same layers are
            # recomputed whatever the pipeline split.
            if int(layer_id) % every == 0:
                _checkpoint_forward(block)
        elif mode == "selective_op":
            _checkpoint_forward(block, context_fn=partial(create_selective_checkpoint_contexts, _op_policy))
        else:
            raise ValueError(f"unknown activation checkpoint mode {mode!r}")
