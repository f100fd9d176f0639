"""4-bit frozen bases for QLoRA / QDoRA: torchao NF4, bitsandbytes NF4 (double quantization) and HQQ.

Each library quantizes with its own code, so the dequantized weights are exactly what that library
gives. How they live under FSDP2:
- torchao's NF4Tensor is a tensor subclass that FSDP2 shards and all-gathers itself; it stays the
  LoRALinear's `weight` parameter.
- bitsandbytes and HQQ produce packed uint8 codes plus statistics. The codes (most of the bytes) become
  a frozen uint8 parameter that FSDP2 shards along dim 0 and all-gathers before each use (FSDP2 never
  casts non-float parameters); the statistics (1/32 of the codes for bnb, 1/4 for HQQ group 64) are kept
  whole on every rank.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.errors import ConfigError

QUANTIZERS = ("nf4", "bnb_nf4", "hqq")
NF4_BLOCK = 64  # weights per absmax scale, as in the QLoRA paper
NF4_SCALER_BLOCK = 256  # scales per double-quantization block (torchao's default)


def nf4_scaler_block(numel: int, shards: int) -> int:
    """torchao double-quantizes the per-block scales in groups; the number of groups must split evenly
    over FSDP's shards. The default 256 is kept whenever it fits, so large models quantize the same on
    any number of ranks; small weights (stories260K's 64 x 64) get the largest group that fits."""
    blocks = numel // NF4_BLOCK
    per_shard = blocks // shards
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, per_shard) + 1) if per_shard % d == 0)


_LIBRARIES = {"nf4": ("torchao", "torchao"), "bnb_nf4": ("bitsandbytes", "bitsandbytes"), "hqq": ("hqq", "hqq")}


def missing_library(kind: str) -> str | None:
    """The pip package `kind` needs, if it cannot be imported."""
    module, package = _LIBRARIES[kind]
    try:
        __import__(module)
    except ImportError:
        return package
    return None


def check_quantizable(name: str, shape: torch.Size, kind: str, *, shards: int, hqq_group_size: int) -> str | None:
    """Why a weight of this shape cannot be quantized with `kind` over `shards` FSDP ranks (None: it can)."""
    rows, numel = shape[0], shape[0] * shape[1]
    if kind == "nf4":
        if numel % NF4_BLOCK:
            return f"{name} {tuple(shape)} has {numel} weights, not a multiple of NF4's block of {NF4_BLOCK}"
        if rows % shards or (numel // NF4_BLOCK) % shards:
            return f"{name} {tuple(shape)} does not split into {shards} FSDP shards of whole NF4 blocks ({NF4_BLOCK} weights)"
    elif kind == "bnb_nf4":
        if numel % NF4_BLOCK:
            return f"{name} {tuple(shape)} has {numel} weights, not a multiple of bitsandbytes' block of {NF4_BLOCK}"
    elif kind == "hqq":
        # HQQ groups consecutive weights of the flattened matrix and packs two groups per byte row.
        if numel % (2 * hqq_group_size):
            return f"{name} {tuple(shape)} has {numel} weights, not an even number of groups of adapters.hqq_group_size={hqq_group_size}"
    return None


def check_4bit_setting(key: str, kind: str, shapes: dict[str, torch.Size], *, dims, hqq_group_size: int, fix: str) -> None:
    """What a 4-bit setting (`key`=`kind`, over layers of these shapes) needs before any work: its library,
    layers that split into whole 4-bit blocks per FSDP shard (else the error ends with `fix`), and, for
    torchao's NF4, a shard group (FSDP2 hands a subclass's all-gather hooks other arguments when the shard
    group is one rank)."""
    package = missing_library(kind)
    if package:
        raise ConfigError(f"{key}={kind} needs the {package} package: pip install {package}")
    for name, shape in shapes.items():
        problem = check_quantizable(name, shape, kind, shards=dims.fsdp_shards, hqq_group_size=hqq_group_size)
        if problem:
            raise ConfigError(f"{key}={kind}: {problem}; {fix}")
    if kind == "nf4" and dims.dp_replicate > 1 and dims.fsdp_shards == 1:
        raise ConfigError(
            f"{key}=nf4 with parallel.dp_replicate > 1 and dp_shard=1 (pure replication) is not supported by "
            f"torchao's NF4 under FSDP2: shard it (parallel.dp_shard > 1, HSDP works), or use bnb_nf4 / hqq"
        )


def bytes_per_layer(kind: str) -> int:
    """Storage per quantized layer besides its weights' share: bitsandbytes keeps two float32 code books
    (16 NF4 values, 256 for the double-quantized absmax) with every layer."""
    return (16 + 256) * 4 if kind == "bnb_nf4" else 0


def bytes_per_weight(kind: str, hqq_group_size: int, dtype_bytes: int = 4) -> tuple[float, float]:
    """Storage per base weight as (sharded by FSDP, kept whole on every rank): the 4-bit codes plus the
    statistics. torchao NF4: an int8 scale per 64 weights (and a float per 256 scales), all sharded.
    bitsandbytes: the same, with its statistics whole. HQQ: a scale and a zero point per group, in the
    weight's dtype, whole."""
    if kind == "nf4":
        return 0.5 + 1 / NF4_BLOCK + dtype_bytes / (NF4_BLOCK * NF4_SCALER_BLOCK), 0.0
    if kind == "bnb_nf4":
        return 0.5, 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)
    return 0.5, 2 * dtype_bytes / hqq_group_size


class PackedWeight(nn.Module):
    """4-bit codes as a frozen uint8 parameter (sharded by FSDP2) plus the library's statistics."""

    def __init__(self, codes: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.codes = nn.Parameter(codes, requires_grad=False)
        self.shape, self.dtype = shape, dtype

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError


class BnbNF4Weight(PackedWeight):
    def __init__(self, weight: torch.Tensor):
        import bitsandbytes.functional as bnbf

        codes, state = bnbf.quantize_4bit(weight, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
        super().__init__(codes, weight.shape, weight.dtype)
        self.quant_state = state  # absmax (itself quantized: double quantization), code book, shape

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(_local(self.codes), self.quant_state).to(self.dtype)


class HqqWeight(PackedWeight):
    def __init__(self, weight: torch.Tensor, group_size: int):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        # HQQ's own quantizer with its defaults (zero point and scale optimised per group, axis 1).
        hqq = HQQLinear(
            linear, quant_config=BaseQuantizeConfig(nbits=4, group_size=group_size), compute_dtype=weight.dtype,
            device=str(weight.device), del_orig=False,
        )
        super().__init__(hqq.W_q.data, weight.shape, weight.dtype)
        self.meta = hqq.meta

    def dequantize(self) -> torch.Tensor:
        from hqq.core.quantize import Quantizer

        return Quantizer.dequantize(_local(self.codes), self.meta).to(self.dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    # Outside forward (exports, DoRA's initial magnitude) FSDP2 leaves the codes sharded: gather them.
    return t.full_tensor() if isinstance(t, DTensor) else t


class DequantLinear(torch.autograd.Function):
    """x @ W.T with W dequantized on the fly, again in backward: no dequantized weight is kept alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        ctx.packed = packed
        return F.linear(x, packed.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.packed.dequantize().to(grad.dtype), None


def quantize(weight: torch.Tensor, kind: str, *, shards: int, hqq_group_size: int) -> torch.Tensor | PackedWeight:
    """The quantized form of a whole (unsharded) weight: an NF4Tensor (nf4) or a PackedWeight module."""
    weight = weight.detach().contiguous()
    if kind == "nf4":
        from torchao.quantization import to_nf4

        return to_nf4(weight, NF4_BLOCK, nf4_scaler_block(weight.numel(), shards))
    if kind == "bnb_nf4":
        return BnbNF4Weight(weight)
    if kind == "hqq":
        return HqqWeight(weight, hqq_group_size)
    raise ValueError(f"unknown 4-bit quantizer {kind!r} (one of {', '.join(QUANTIZERS)})")


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A whole or local weight, possibly NF4, as a plain float tensor (DTensors stay DTensors)."""
    if isinstance(weight, DTensor):
        local = dequantize(weight.to_local())
        return DTensor.from_local(local, weight.device_mesh, weight.placements, shape=weight.shape, stride=_stride(weight.shape))
    if type(weight).__name__ == "NF4Tensor" or type(weight.data).__name__ == "NF4Tensor":
        return weight.get_original_weight()
    return weight


def _stride(shape: torch.Size) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
