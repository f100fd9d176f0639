"""Tensor + sequence parallelism as DTensor plans over the model's own modules.

Between blocks the residual stream is split along the sequence (Shard(1)), so norms run on 1/tp of the
tokens; attention and the MLP gather the sequence, split heads / hidden columns (colwise in, rowwise
out), and scatter the sequence again. With loss_parallel the logits stay split over the vocabulary
and the cross-entropy is computed without gathering them.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def apply_tp(model: nn.Module, *, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    # Top-level modules; a pipeline stage may lack some of them.
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            # cos and sin are plain tensors, the same on every rank: passed through untouched.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        parallelize_module(block, tp_mesh, plan)

    if async_tp:
        # Lets compiled blocks fuse the sequence all-gather / reduce-scatter into the matmuls.
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        import torch._inductor.config as inductor_config

        inductor_config._micro_pipeline_tp = True
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
