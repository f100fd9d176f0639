"""Causal attention for queries that are runs of a longer sequence (a context-parallel rank's chunks),
exact and without a mask, on CPU.

A run of n queries starting at position s sees every key before s and the keys of its own run causally.
SDPA can express that only with a boolean mask of n x (s + n), which its CPU kernel turns into a float
one: at 16K tokens on 2 ranks that is 670 MiB per layer call, more than context parallelism saves. So
each run is two flash-attention calls, the visible prefix (no mask) and the causal diagonal block, merged
by their log-sum-exps; the backward runs each block's flash backward against the merged output and
log-sum-exp, which is exactly the gradient of the whole (the way ring attention computes it). Memory
stays linear in the sequence.

It uses the CPU flash kernel's own entry points, which return the log-sum-exp public SDPA hides
(parallel/library_patches.py lists them). Other devices take the mask (or FlexAttention when compiled).
"""

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _repeat(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of repeated kv heads, summed back onto each kv head."""
    if groups == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // groups, groups, s, d).sum(dim=2)


class _PrefixAndCausalBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k_block, v_block, groups: int):
        out_block, lse_block = _flash(q, _repeat(k_block, groups), _repeat(v_block, groups), 0.0, True)
        if k_prefix.shape[2] == 0:
            out, lse = out_block, lse_block
        else:
            out_prefix, lse_prefix = _flash(q, _repeat(k_prefix, groups), _repeat(v_prefix, groups), 0.0, False)
            lse = torch.logaddexp(lse_prefix, lse_block)
            out = (out_prefix * (lse_prefix - lse).exp().unsqueeze(-1).to(out_prefix.dtype)
                   + out_block * (lse_block - lse).exp().unsqueeze(-1).to(out_block.dtype))
        ctx.save_for_backward(q, k_prefix, v_prefix, k_block, v_block, out, lse)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_prefix, v_prefix, k_block, v_block, out, lse = ctx.saved_tensors
        g = ctx.groups
        grad_out = grad_out.contiguous()
        dq, dk_block, dv_block = _flash_backward(grad_out, q, _repeat(k_block, g), _repeat(v_block, g), out, lse, 0.0, True)
        dk_prefix = dv_prefix = None
        if k_prefix.shape[2] > 0:
            dq_prefix, dk_prefix, dv_prefix = _flash_backward(grad_out, q, _repeat(k_prefix, g), _repeat(v_prefix, g), out,
                                                              lse, 0.0, False)
            dq = dq + dq_prefix
            dk_prefix, dv_prefix = _fold(dk_prefix, g), _fold(dv_prefix, g)
        else:
            dk_prefix, dv_prefix = torch.zeros_like(k_prefix), torch.zeros_like(v_prefix)
        return dq, dk_prefix, dv_prefix, _fold(dk_block, g), _fold(dv_block, g), None


def runs_of(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """(offset in `index`, first position, length) of each run of consecutive positions."""
    values = index.tolist()
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, values[start], i - start))
            start = i
    return runs


def causal_runs_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """q (batch, heads, queries, dim) held as `runs` of the sequence; k, v (batch, kv_heads, sequence, dim)
    of the whole sequence in order. Each run attends causally to the keys up to its own end."""
    groups = q.shape[1] // k.shape[1]
    outs = []
    for offset, first, n in runs:
        qr = q[:, :, offset : offset + n].contiguous()
        outs.append(_PrefixAndCausalBlock.apply(qr, k[:, :, :first].contiguous(), v[:, :, :first].contiguous(),
                                                k[:, :, first : first + n].contiguous(),
                                                v[:, :, first : first + n].contiguous(), groups))
    return torch.cat(outs, dim=2)
