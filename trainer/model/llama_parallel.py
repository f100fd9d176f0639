"""Llama's tensor + sequence parallel plan (its model family's entry hands it to parallel/).

Between blocks the residual stream is split along the sequence (Shard(1)), so norms run on 1/tp of the
tokens; attention and the MLP gather the sequence, split heads / hidden columns (colwise in, rowwise
out), and scatter the sequence again. With loss_parallel the logits stay split over the vocabulary
and the cross-entropy is computed without gathering them.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from parallel.tp import TPPlan


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
        def first(kind: str, plain: Callable[..., ParallelStyle]):
            def pick(module: nn.Module, *args, **kwargs) -> ParallelStyle:
                chosen = (getattr(s, kind)(module, *args, **kwargs) for s in styles)
                return next((c for c in chosen if c is not None), None) or plain(**kwargs)
            return pick

        return LinearStyles(colwise=first("colwise", ColwiseParallel), rowwise=first("rowwise", RowwiseParallel),
                            prepare_input=first("prepare_input", PrepareModuleInput))


def llama_tp_plan(model: nn.Module, *, loss_parallel: bool, styles: LinearStyles = LinearStyles()) -> TPPlan:
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
        attn, ffn = block.attention, block.feed_forward
        return {
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
            "feed_forward": prepare_input(
                ffn, ["w1", "w3"], input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": colwise(ffn.w1),
            "feed_forward.w2": rowwise(ffn.w2, output_layouts=Shard(1)),
            "feed_forward.w3": colwise(ffn.w3),
        }

    return TPPlan(top=top, block=block)
