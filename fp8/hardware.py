"""Whether this machine has float8 matmuls, and how fast they are next to bf16.

Float8 matmuls (torch._scaled_mm) need an NVIDIA GPU of compute capability 8.9 or newer (Ada: L4, L40S;
Hopper: H100, H200; Blackwell). Elsewhere torchao can only emulate them in high precision.
"""

import torch

# Dense float8 peak over dense bf16 peak (vendor datasheets): 2x on Ada and Hopper.
_FLOAT8_OVER_BF16 = {"H200": 2.0, "H100": 2.0, "L40S": 2.0, "L4": 2.0, "B200": 2.0, "GB200": 2.0}


def missing_float8_hardware() -> str | None:
    """None where float8 matmuls run natively; otherwise what this machine has instead."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    return None


def float8_peak_ratio(emulate: bool) -> tuple[float, str]:
    """(the device's float8 peak FLOP/s over its bf16 peak, where that came from). Emulated float8 runs
    at the high-precision rate."""
    if emulate or not torch.cuda.is_available():
        return 1.0, "emulated float8 runs at the high-precision rate"
    name = torch.cuda.get_device_name()
    for key, ratio in _FLOAT8_OVER_BF16.items():
        if key in name:
            return ratio, f"{name} datasheet float8 / bf16"
    return 2.0, f"{name} not in the table: float8 assumed 2x bf16, as on Ada and Hopper"
