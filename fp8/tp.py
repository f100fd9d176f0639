"""Float8 tensor parallelism: torchao's styles for the float8 linear layers (tensorwise recipe), which
cast activations to float8 before the sequence all-gather, so TP moves half the bytes of bf16.

The rowwise recipes have no float8 styles in torchao: their float8 layers take the plain styles and
cast after the all-gather (torchtitan does the same).
"""

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from parallel.tp import LinearStyles


def _is_float8(module: nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)


def _colwise(module: nn.Module, **kwargs) -> ParallelStyle | None:
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel

    return Float8ColwiseParallel(**kwargs) if _is_float8(module) else None


def _rowwise(module: nn.Module, **kwargs) -> ParallelStyle | None:
    from torchao.float8.float8_tensor_parallel import Float8RowwiseParallel

    return Float8RowwiseParallel(**kwargs) if _is_float8(module) else None


def _prepare_input(module: nn.Module, consumers: list[str], **kwargs) -> ParallelStyle | None:
    """Casts the module's input to float8 once, before the all-gather, when every layer it feeds is a
    float8 layer (a filtered or adapted one needs the high-precision input)."""
    from torchao.float8.float8_tensor_parallel import PrepareFloat8ModuleInput

    if not all(_is_float8(module.get_submodule(name)) for name in consumers):
        return None
    return PrepareFloat8ModuleInput(**kwargs, float8_dtype=torch.float8_e4m3fn, fwd_config_submodule_fqn=consumers[0])


FLOAT8_STYLES = LinearStyles(colwise=_colwise, rowwise=_rowwise, prepare_input=_prepare_input)
