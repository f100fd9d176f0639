"""Tensor + sequence parallelism as DTensor plans over the model's own modules.

Between blocks the residual stream is split along the sequence (Shard(1)), so norms run on 1/tp of the
tokens; attention and the MLP gather the sequence, split heads / hidden columns (colwise in, rowwise
out), and scatter the sequence again. With loss_parallel the logits stay split over the vocabulary
and the cross-entropy is computed without gathering them.
"""

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from trainer.adapters.lora import LoRALinear


def _distribute_lora(placements: dict[str, Placement], name, module: nn.Module, mesh: DeviceMesh) -> None:
    for param_name, param in list(module.named_parameters(recurse=False)):
        dtensor = distribute_tensor(param, mesh, [placements[param_name]], src_data_rank=None)
        module.register_parameter(param_name, nn.Parameter(dtensor, requires_grad=param.requires_grad))


class _LoRAStyle:
    """A parallel style's layouts applied to a LoRALinear: each parameter gets the placement in PLACEMENTS."""

    PLACEMENTS: dict[str, Placement]

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, partial(_distribute_lora, self.PLACEMENTS),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LoRAColwise(_LoRAStyle, ColwiseParallel):
    """Column-parallel LoRA: W, B and DoRA's magnitude split by output rows like the base layer; A
    stays whole, so the rank-r activations need no communication. DoRA's row norms are then local."""

    PLACEMENTS = {"weight": Shard(0), "lora_a": Replicate(), "lora_b": Shard(0), "magnitude": Shard(0)}


class LoRARowwise(_LoRAStyle, RowwiseParallel):
    """Row-parallel LoRA: W and A split by input columns, B and the magnitude whole; the base and the
    update are both partial sums, reduced together by the layer's one reduce-scatter."""

    PLACEMENTS = {"weight": Shard(1), "lora_a": Shard(1), "lora_b": Replicate(), "magnitude": Replicate()}
    desired_input_layouts = (Shard(-1),)


def _colwise(module: nn.Module, **kwargs) -> ColwiseParallel:
    return LoRAColwise(**kwargs) if isinstance(module, LoRALinear) else ColwiseParallel(**kwargs)


def _rowwise(module: nn.Module, **kwargs) -> RowwiseParallel:
    return LoRARowwise(**kwargs) if isinstance(module, LoRALinear) else RowwiseParallel(**kwargs)


def apply_tp(model: nn.Module, *, tp_mesh: DeviceMesh, loss_parallel: bool, async_tp: bool) -> None:
    # SequenceParallel re-creates the norm weights as new Parameters that require grad: remember what
    # the adapters froze and freeze it again afterwards.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    # Top-level modules; a pipeline stage may lack some of them.
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
        top["output"] = _colwise(
            model.output, input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        plan = {
            "attention_norm": SequenceParallel(),
            # cos and sin are plain tensors, the same on every rank: passed through untouched.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.wq": _colwise(attn.wq),
            "attention.wk": _colwise(attn.wk),
            "attention.wv": _colwise(attn.wv),
            "attention.wo": _rowwise(attn.wo, output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": _colwise(ffn.w1),
            "feed_forward.w2": _rowwise(ffn.w2, output_layouts=Shard(1)),
            "feed_forward.w3": _colwise(ffn.w3),
        }
        parallelize_module(block, tp_mesh, plan)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)

    if async_tp:
        # Lets compiled blocks fuse the sequence all-gather / reduce-scatter into the matmuls.
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        import torch._inductor.config as inductor_config

        inductor_config._micro_pipeline_tp = True
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
