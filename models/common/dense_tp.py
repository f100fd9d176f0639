"""The tensor + sequence parallel plan of dense blocks (models/common/dense.py); a family's entry hands it
to parallel/, with the styles of the linear layers converters created.

Between blocks the residual stream is split along the sequence (Shard(1)), so norms run on 1/tp of the
tokens; attention and the MLP gather the sequence, split heads / hidden columns (colwise in, rowwise
out), and scatter the sequence again. With loss_parallel the logits stay split over the vocabulary
and the cross-entropy is computed without gathering them.
"""

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel, SequenceParallel

from parallel.tp import LinearStyles, TPPlan


def dense_tp_plan(model: nn.Module, *, loss_parallel: bool, styles: LinearStyles = LinearStyles()) -> TPPlan:
    styles = LinearStyles.combine([styles])  # the plain styles for what `styles` leaves
    colwise, rowwise, prepare_input = styles.colwise, styles.rowwise, styles.prepare_input
    # Top-level modules; a pipeline stage may lack some of them.
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["output"] = colwise(
            model.output, input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )

    def block(block: nn.Module) -> dict[str, ParallelStyle]:
        attn = block.attention
        plan = {
            "attention_norm": SequenceParallel(),
            # cos and sin are plain tensors, the same on every rank: passed through untouched.
            "attention": prepare_input(
                attn, ["wq", "wk", "wv"], input_layouts=(Shard(1), None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            "attention.wq": colwise(attn.wq),
            "attention.wk": colwise(attn.wk),
            "attention.wv": colwise(attn.wv),
            "attention.wo": rowwise(attn.wo, output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        ffn = getattr(block, "feed_forward", None)  # a mixture-of-experts block's is its family's to plan
        if ffn is not None:
            plan.update({
                "feed_forward": prepare_input(
                    ffn, ["w1", "w3"], input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
                ),
                "feed_forward.w1": colwise(ffn.w1),
                "feed_forward.w2": rowwise(ffn.w2, output_layouts=Shard(1)),
                "feed_forward.w3": colwise(ffn.w3),
            })
        return plan

    return TPPlan(top=top, block=block)
