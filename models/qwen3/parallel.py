"""Qwen3's tensor-parallel plan: the dense one, plus its per-head query / key norms.

Under TP each rank holds whole heads, so the norms run locally; their (replicated) weights then get a
partial gradient on each rank. SequenceParallel over the heads dimension (2 of batch, seq, heads,
head_dim) makes the weights replicated DTensors whose gradients DTensor sums over the TP ranks."""

from torch import nn
from torch.distributed.tensor.parallel import SequenceParallel

from models.common.dense_tp import dense_tp_plan
from parallel.tp import LinearStyles, TPPlan


def qwen3_tp_plan(model: nn.Module, *, loss_parallel: bool, styles: LinearStyles = LinearStyles()) -> TPPlan:
    dense = dense_tp_plan(model, loss_parallel=loss_parallel, styles=styles)

    def block(block: nn.Module):
        plan = dense.block(block)
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        return plan

    return TPPlan(top=dense.top, block=block)
