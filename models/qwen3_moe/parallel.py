"""Qwen3-MoE's tensor-parallel plan: Qwen3's for attention and the dense layers; a mixture-of-experts layer
runs whole on each rank's own slice of the sequence.

Between blocks the residual stream is split along the sequence over the tp ranks, and a MoE layer is
token-wise (each token is routed and transformed alone), so it needs no gather: each rank routes its own
tokens, as a data-parallel rank does, and sends them to the ranks holding their experts, which the tp
ranks split further (ep x tp of them); the router and shared experts are FSDP-sharded over the
data-parallel ranks x tp, which sums their gradients (parallel/mesh.py, parallel/fsdp.py). Splitting each
expert's matmuls over tp instead would need the whole sequence gathered and every expert cut into tp
slivers, too small to run well.
"""

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import PrepareModuleInputOutput

from models.qwen3.parallel import qwen3_tp_plan
from parallel.tp import LinearStyles, TPPlan


def qwen3_moe_tp_plan(model: nn.Module, *, loss_parallel: bool, styles: LinearStyles = LinearStyles()) -> TPPlan:
    qwen3 = qwen3_tp_plan(model, loss_parallel=loss_parallel, styles=styles)

    def block(block: nn.Module):
        plan = qwen3.block(block)
        if hasattr(block, "moe"):
            # The rank's slice of the sequence in as a plain tensor; the layer's output, the same slice, back
            # as the sequence-split DTensor the residual stream is.
            plan["moe"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_input=True,
                output_layouts=(Shard(1),), desired_output_layouts=(Shard(1),),
            )
        return plan

    return TPPlan(top=qwen3.top, block=block)
