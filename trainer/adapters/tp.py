"""How adapter layers split under tensor parallelism: LoRA-aware colwise / rowwise styles that a model
family's TP plan uses for the linear layers the adapters replaced."""

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from trainer.adapters.lora import LoRALinear
from parallel.tp import LinearStyles


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


def _colwise(module: nn.Module, **kwargs) -> ColwiseParallel | None:
    return LoRAColwise(**kwargs) if isinstance(module, LoRALinear) else None


def _rowwise(module: nn.Module, **kwargs) -> RowwiseParallel | None:
    return LoRARowwise(**kwargs) if isinstance(module, LoRALinear) else None


# What the adapter transform gives a model family's TP plan: its own styles for the layers it adapted.
ADAPTER_STYLES = LinearStyles(colwise=_colwise, rowwise=_rowwise)


