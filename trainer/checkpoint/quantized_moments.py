"""Block-quantized optimizer moments (torchao's 8-bit and 4-bit AdamW) in a checkpoint.

A quantized moment is codes (1 byte or half a byte per value) and one float32 scale per block of the
rank's local shard, so its raw form is tied to the layout that wrote it. A checkpoint holds instead:
- the moment's values (float32, dequantized), as a DTensor with the parameter's placements like any
  optimizer state: DCP reshards them onto any layout, and a run can resume them with another optimizer
  (plain AdamW reads them as its own);
- each rank's block scales, under a key naming the shard they belong to (mesh shape, placements and
  the rank's coordinate). A resume on the same layout finds its key and quantizes the values with the
  saved scales, which gives back the very same codes and scales, so training continues bitwise.
  Recomputing the scales from the values would not: the signed code books' most negative values are
  -0.9930 (8-bit) and -0.8875 (4-bit), so a block whose largest magnitude is negative dequantizes to
  that fraction of its scale and would be rescaled, its codes moved. A resume on another layout finds no key and quantizes afresh (blocks fall elsewhere).
Saving therefore holds a float32 copy of each moment until the write is done.
"""

import torch
from torch.distributed.tensor import DTensor

SCALES_INFIX = ".block_scales@"


def is_quantized(value: torch.Tensor) -> bool:
    local = value.to_local() if isinstance(value, DTensor) else value
    return all(hasattr(local, name) for name in ("codes", "scale", "qmap", "dequantize"))


def _shard_name(value: torch.Tensor) -> str:
    """Which shard of the tensor this rank holds: the same string on a resume with the same layout."""
    if not isinstance(value, DTensor):
        return "whole"
    placements = ",".join(str(p) for p in value.placements)
    mesh = "x".join(str(n) for n in value.device_mesh.shape)
    coordinate = ",".join(str(c) for c in value.device_mesh.get_coordinate())
    return f"mesh[{mesh}]({placements})at[{coordinate}]"


def scales_key(key: str, value: torch.Tensor) -> str:
    return f"{key}{SCALES_INFIX}{_shard_name(value)}"


def to_checkpoint(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The entries a quantized moment is saved as: its float32 values and this rank's block scales."""
    if not isinstance(value, DTensor):
        return {key: value.dequantize(torch.float32), scales_key(key, value): value.scale}
    local = value.to_local()
    values = DTensor.from_local(local.dequantize(torch.float32), value.device_mesh, value.placements,
                                run_check=False, shape=value.shape, stride=value.stride())
    return {key: values, scales_key(key, value): local.scale}


def restore_(live: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Quantizes saved float32 `values` into the optimizer's moment `live`, in place: with the saved block
    scales where the layout is the one that wrote them, else as torchao quantizes any new moment."""
    live = live.to_local() if isinstance(live, DTensor) else live
    values = (values.to_local() if isinstance(values, DTensor) else values).float()
    if scales is None:
        live.copy_(values)
        return
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, quantize_8bit_with_qmap

    blocks = values.reshape(scales.numel(), -1) / scales.view(-1, 1)
    packed = live.codes.numel() != values.numel()  # 4-bit: two codes per byte
    if packed:
        codes = quantize_4bit_with_qmap(blocks.view(-1), live.qmap)
        live.codes.copy_((codes[::2] << 4) | codes[1::2])
    else:
        live.codes.copy_(quantize_8bit_with_qmap(blocks, live.qmap).view(live.codes.shape))
    live.scale.copy_(scales)
