"""Quantized exports (export.quantized): the model's linear layers stored quantized, in compressed-tensors'
format, next to the Hugging Face export.

Why compressed-tensors: it is the format vLLM reads natively for all three (Marlin / Machete kernels for
W4A16, CUTLASS for W8A8 int8 and float8), the one the published quantized Llama 3.1 evaluations were made
in, and transformers loads it (the `compressed-tensors` package dequantizes on CPU and simulates the
activation rounding), so one export serves both. Its tensors are plain safetensors entries with the
scheme in config.json, which we write ourselves; the package is needed only to load them back.

  w4a16      int4 weights, symmetric, one bfloat16 scale per group of input features (pack-quantized: 8
             codes to an int32); activations as they are
  w8a8_int8  int8 weights, symmetric, one float32 scale per output row; int8 activations per token,
             dynamic and asymmetric (as QAT's int8 activations)
  w8a8_fp8   float8 e4m3 weights, one float32 scale per output row; float8 activations per token, dynamic

The codes and scales are those of trainer/qat/schemes.py, computed from the weights in the dtype the
training forward saw them in: a QAT run's export is exactly the model it trained (the trained
quantization), any other run's is post-training quantization (PTQ) of its weights. The layers are those
QAT rounds (trainer/converters/qat.py): the blocks' linear layers and each expert's projections (stored one
expert at a time, as Hugging Face checkpoints hold them), the head with qat.head; routers and embeddings
stay in the export dtype (vLLM serves embeddings unquantized).
"""

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from models import DecoderArgs, build_meta_model, family_of
from trainer.config.schema import QATConfig
from models.common.linear import product_of, set_product
from models.common.moe import GroupedExperts
from trainer.qat.layers import QATEmbedding, QATLinear, chosen_layers, qat_layers, round_experts, rounding_of
from trainer.qat.schemes import SCHEMES, Scheme, dequantize_weight, weight_codes, weight_scale


@dataclass(frozen=True)
class QuantizedFormat:
    name: str
    scheme: Scheme  # the weights' rounding (activations: `activations` below, for the config)
    format: str  # compressed-tensors' name for how the tensors are stored
    weights: dict
    activations: dict | None
    words: str


_WEIGHT_INT4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}
FORMATS = {
    "w4a16": QuantizedFormat("w4a16", SCHEMES["int4_weight_only"], "pack-quantized", _WEIGHT_INT4, None,
                             "W4A16: int4 weights per group"),
    "w8a8_int8": QuantizedFormat(
        "w8a8_int8", SCHEMES["int8_dynact_int8_weight"], "int-quantized",
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True},
        "W8A8 int8: weights per row, activations per token"),
    "w8a8_fp8": QuantizedFormat(
        "w8a8_fp8", SCHEMES["float8"], "float-quantized",
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
        {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
        "W8A8 float8: weights per row, activations per token"),
}


def quantization_config(fmt: QuantizedFormat, group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config: the scheme, for transformers and vLLM."""
    weights = {**fmt.weights, "group_size": group_size} if fmt.weights["strategy"] == "group" else dict(fmt.weights)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": fmt.activations,
                                      "output_activations": None, "format": fmt.format}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes in [-8, 7] -> (rows, ceil(cols / 8)) int32: code i of each run of 8 at bits
    4i..4i+3, offset by 8 to be unsigned, a row's last word padded with zero bits (compressed-tensors'
    pack-quantized layout)."""
    rows, cols = codes.shape
    nibbles = torch.nn.functional.pad(codes.to(torch.int64) + 8, (0, -cols % 8)).reshape(rows, -1, 8)
    words = (nibbles << torch.arange(0, 32, 4, dtype=torch.int64)).sum(dim=-1)  # in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same bits, as int32


def quantize_linear(weight: torch.Tensor, fmt: QuantizedFormat, group_size: int, compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear layer's weight (suffixes after the module name)."""
    w = weight.to(compute_dtype)  # as the training forward rounded it
    scale = weight_scale(w, fmt.scheme, group_size)
    codes = weight_codes(w, scale, fmt.scheme, group_size)
    if fmt.name == "w4a16":
        return {"weight_packed": pack_int4(codes), "weight_scale": scale.contiguous(),
                "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    if fmt.name == "w8a8_int8":
        return {"weight": codes.to(torch.int8), "weight_scale": scale.contiguous()}
    return {"weight": codes.to(torch.float8_e4m3fn), "weight_scale": scale.contiguous()}


def quantized_writing(args: DecoderArgs, qat: QATConfig, fmt: QuantizedFormat, compute_dtype: torch.dtype) -> dict:
    """write_hf's keyword arguments (trainer/weights/hf_export.py) for a quantized export of this model:
    which tensors it replaces, and the config that says so."""
    meta = build_meta_model(args)
    hf = family_of(args).hf
    layers = chosen_layers(meta, qat)
    linears = {name: reason for name, reason in layers.items() if isinstance(meta.get_submodule(name), nn.Linear)}
    chosen = {f"{name}.weight" for name, reason in linears.items() if reason is None}
    # Stacked experts: the HF checkpoint holds each expert's projections as linear layers of their own
    # (hf_tensors hands them over one by one), quantized as any other.
    chosen |= {f"{name}.{w}" for name, reason in layers.items() if reason is None
               and isinstance(meta.get_submodule(name), GroupedExperts) for w in ("w1", "w2", "w3")}
    ignore = [hf_name.removesuffix(".weight") for name, reason in linears.items() if reason is not None
              for hf_name, _ in hf.hf_tensors(f"{name}.weight", meta.get_submodule(name).weight)]

    def quantize(name: str, hf_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if name not in chosen:
            return None
        module = hf_name.removesuffix(".weight")
        return {f"{module}.{key}": t for key, t in quantize_linear(weight, fmt, qat.group_size, compute_dtype).items()}

    return {"quantize": quantize, "quantization_config": quantization_config(fmt, qat.group_size, ignore)}


def quantized_model(model: nn.Module, scheme: Scheme, qat: QATConfig) -> nn.Module:
    """A copy of a plain `model` whose layers that the exports quantize round their weights and inputs by
    `scheme`: our own model of an export (FORMATS[name].scheme), for evaluation and the oracle of the
    export's reload, or post-training quantization by any scheme."""
    rounded = copy.deepcopy(model)
    cfg = dataclasses.replace(qat, scheme=scheme.name, embeddings=False)
    for name, reason in chosen_layers(rounded, cfg).items():
        if reason is None:
            _round(rounded.get_submodule(name), scheme, qat.group_size)
    return rounded


def _round(layer: nn.Module, scheme: Scheme, group_size: int, round_weights: bool = True) -> None:
    if isinstance(layer, GroupedExperts):
        round_experts(layer, scheme, group_size, round_weights)
    else:
        QATLinear.swap(layer, scheme, group_size, round_weights)


_COMPARED = ("num_bits", "type", "symmetric", "strategy", "dynamic")


def format_of(config: dict) -> tuple[QuantizedFormat, int]:
    """Which of our formats (and group size) a checkpoint's quantization_config states; ValueError, saying
    what it is, for any other (we read back what we write, not every compressed-tensors scheme)."""
    groups = config.get("config_groups") or {}
    if config.get("quant_method") != "compressed-tensors" or len(groups) != 1:
        raise ValueError(f"its quantization_config (quant_method {config.get('quant_method')!r}, {len(groups)} config "
                         f"group(s)) is not one of our quantized exports")
    group = next(iter(groups.values()))
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    for fmt in FORMATS.values():
        same_inputs = (inputs is None) == (fmt.activations is None) and \
            (inputs is None or all(inputs.get(k) == fmt.activations[k] for k in _COMPARED))
        if all(weights.get(k) == fmt.weights[k] for k in _COMPARED) and same_inputs \
                and config.get("format") == fmt.format:
            return fmt, weights.get("group_size") or 0
    raise ValueError(f"its quantization ({config.get('format')}: weights {weights}, activations {inputs}) is not one of "
                     f"our quantized exports ({', '.join(FORMATS)}); load it with transformers, which dequantizes it, "
                     f"and save it unquantized")


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    return (nibbles.reshape(shape[0], -1)[:, : shape[1]] - 8).to(torch.int8)


def dequantize_stored(stored: dict[str, torch.Tensor], fmt: QuantizedFormat, group_size: int) -> torch.Tensor:
    """A linear layer's float32 weight from its stored tensors (suffixes as quantize_linear writes them)."""
    if fmt.name == "w4a16":
        shape = tuple(int(n) for n in stored["weight_shape"])
        codes = unpack_int4(stored["weight_packed"], shape)
    else:
        codes = stored["weight"]
    return dequantize_weight(codes, stored["weight_scale"], fmt.scheme, group_size)


def serve_rounding(model: nn.Module, names: list[str], fmt: QuantizedFormat, group_size: int) -> None:
    """The layers `names` of a model loaded from `fmt`'s export hold dequantized weights, already on the
    grid: they round their inputs as the served model does (W8A8), their weights no more."""
    for name in names:
        _round(model.get_submodule(name), fmt.scheme, group_size, round_weights=False)


@contextlib.contextmanager
def rounded_as(parts: list[nn.Module], fmt: QuantizedFormat | None, qat: QATConfig):
    """Within it, the live model (any layout: under FSDP2 and TP the blocks' linear layers keep their
    classes) computes as `fmt`'s export would serve it, or, for None, with QAT's rounding off (its
    high-precision self); as it was after."""
    switches, swapped = [], []
    cfg = dataclasses.replace(qat, scheme=fmt.scheme.name if fmt else "none", embeddings=False)
    for part in parts:
        if fmt is None:
            for layer in qat_layers(part):
                holder, flag = (layer, "fake_quant") if isinstance(layer, QATEmbedding) else (rounding_of(layer), "on")
                switches.append((holder, flag, getattr(holder, flag)))
                setattr(holder, flag, False)
            continue
        for name, reason in chosen_layers(part, cfg).items():
            if reason is None:
                layer = part.get_submodule(name)
                experts = isinstance(layer, GroupedExperts)
                swapped.append((layer, type(layer), layer.rounding if experts else product_of(layer)))
                _round(layer, fmt.scheme, qat.group_size)
    try:
        yield
    finally:
        for holder, flag, value in switches:
            setattr(holder, flag, value)
        for layer, kind, rounding in swapped:
            if isinstance(layer, GroupedExperts):
                layer.rounding = rounding
            else:
                layer.__class__ = kind
                set_product(layer, rounding)
