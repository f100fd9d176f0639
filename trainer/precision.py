"""Mixed precision: parameters stay float32 for the optimizer; compute runs in `param_dtype`.

With FSDP2 the policy lives in fully_shard (casting on all-gather); without FSDP (one process, or
tensor / pipeline parallelism alone) autocast does the casting instead.
"""

import contextlib
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls in hardware. There bf16 autocast ran 1.57x (6.2M parameters) and
    2.37x (207M) fp32 on the benchmark machine (docs/performance.md); without them bf16 is emulated."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


@dataclass(frozen=True)
class Precision:
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype

    @classmethod
    def from_config(cls, param: str, reduce: str, device: torch.device) -> "Precision":
        if param == "auto":
            param = "bfloat16" if device.type == "cuda" or cpu_has_native_bf16() else "float32"
        return cls(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[reduce])

    def autocast(self, device: torch.device, fsdp: bool):
        if fsdp or self.param_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.param_dtype)
