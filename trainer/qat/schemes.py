"""The quantization schemes a model is trained for (QAT) and exported in, as numbers: for each, how a weight
and (where the scheme quantizes them) a layer's input activations are rounded.

One definition serves both ends. Training runs the fake-quantized forward (quantize, then dequantize, in
high precision) so the weights learn to sit well on the grid; the export quantizes with the same scales, so
the served model computes what the trained one did. The formulas are torchao's (its QAT fake quantizers and
the post-training configs they mirror), which tests/unit/test_qat.py checks to 1e-6:

- int4 / int8 weights, symmetric: scale = max|w| over the group / ((qmax - qmin) / 2), codes
  clamp(round(w / scale), qmin, qmax), zero point 0. A group is `group_size` consecutive input features of
  one output row (per group), or the whole row (per channel).
- int8 activations, asymmetric per token: scale = (max(x, 0) - min(x, 0)) / 255 over the token's features,
  zero point -128 - round(min(x, 0) / scale).
- float8 (e4m3) weights per output row and activations per token: scale = max|x| / 448, values
  x / scale cast to float8.

Scales are statistics of the tensor, held constant in the backward: gradients pass the rounding straight
through (and stop where a value was clamped). torchao's integer schemes do the same; its float8 fake
quantizer also differentiates through the row maximum, which changes only the gradient of each row's
largest entry.

The per-token and per-row statistics are reductions over the last dimension; on a DTensor sharded there
(the input of a row-wise tensor-parallel layer) DTensor reduces them over the shards, so every rank uses
the one-process scales.
"""

from dataclasses import dataclass

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: str  # "int4" | "int8" | "float8"
    per_group: bool  # weights scaled per group of input features (else per output row)
    activations: str | None  # None (weight-only) | "int8" | "float8"
    words: str  # for the start line



SCHEMES = {
    "int8_dynact_int4_weight": Scheme("int8_dynact_int4_weight", "int4", True, "int8",
                                      "int8 activations per token (dynamic, asymmetric), int4 weights per group"),
    "int4_weight_only": Scheme("int4_weight_only", "int4", True, None, "int4 weights per group, activations as they are"),
    "int8_dynact_int8_weight": Scheme("int8_dynact_int8_weight", "int8", False, "int8",
                                      "int8 activations per token (dynamic, asymmetric), int8 weights per output row"),
    "float8": Scheme("float8", "float8", False, "float8",
                     "float8 e4m3 activations per token (dynamic) and weights per output row"),
}

_INT_RANGE = {"int4": (-8, 7), "int8": (-128, 127)}


class _RoundThrough(torch.autograd.Function):
    """round() in the forward, the identity in the backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _CastThrough(torch.autograd.Function):
    """A cast to float8 and back (to float32) in the forward, the identity in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.to(FLOAT8).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(rows, groups, group_size) view of a 2-D weight; one group per row when group_size is None."""
    rows, cols = w.shape
    size = cols if group_size is None else group_size
    return w.reshape(rows, cols // size, size)


def weight_scale(w: torch.Tensor, scheme: Scheme, group_size: int) -> torch.Tensor:
    """The scales of a 2-D weight: (rows, groups) for the integer schemes (bfloat16 per group, so that a
    group of 32 int4 codes and its scale take 18 bytes; float32 per row), (rows, 1) float32 for float8."""
    with torch.no_grad():
        w = w.float()
        if scheme.weight == "float8":
            return _float8_scale(w)
        qmin, qmax = _INT_RANGE[scheme.weight]
        g = _grouped(w, group_size if scheme.per_group else None)
        biggest = torch.maximum(-g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0))
        scale = (biggest / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).smallest_normal)
        return scale.to(torch.bfloat16 if scheme.per_group else torch.float32)


def weight_codes(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme, group_size: int) -> torch.Tensor:
    """`w` on the scheme's grid under `scale`, in float32 and the weight's shape: integer codes for the
    integer schemes (to be multiplied by their scale), float8 values for float8. Straight-through."""
    w = w.float()
    if scheme.weight == "float8":
        return _CastThrough.apply((w / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX))
    qmin, qmax = _INT_RANGE[scheme.weight]
    g = _grouped(w, group_size if scheme.per_group else None)
    return torch.clamp(_RoundThrough.apply(g * (1.0 / scale.unsqueeze(-1))), qmin, qmax).reshape(w.shape)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, scheme: Scheme, group_size: int) -> torch.Tensor:
    """codes x scale, in float32 (exact: a code has at most 8 significant bits, a scale at most 24)."""
    codes = codes.float()
    if scheme.weight == "float8":
        return codes * scale
    g = _grouped(codes, group_size if scheme.per_group else None)
    return (g * scale.unsqueeze(-1).float()).reshape(codes.shape)


def fake_weight(w: torch.Tensor, scheme: Scheme, group_size: int) -> torch.Tensor:
    """`w` rounded to the scheme's weight grid, back in its own dtype."""
    scale = weight_scale(w, scheme, group_size)
    return dequantize_weight(weight_codes(w, scale, scheme, group_size), scale, scheme, group_size).to(w.dtype)


def _float8_scale(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per row (the last dimension reduced and kept). A row of zeros gets a tiny scale
    rather than 0 (which would make its values 0/0)."""
    return (x.abs().amax(dim=-1, keepdim=True) / FLOAT8_MAX).clamp(min=1e-12)


def fake_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric int8 over each token's features (the last dimension), computed in float32."""
    x32 = x.float()
    with torch.no_grad():
        low = x32.amin(dim=-1, keepdim=True).clamp(max=0)
        high = x32.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = ((high - low) / 255.0).clamp(min=torch.finfo(torch.float32).smallest_normal)
        zero = torch.clamp(-128 - torch.round(low / scale), -128, 127)
    codes = torch.clamp(_RoundThrough.apply(x32 * (1.0 / scale)) + zero, -128, 127)
    return ((codes - zero) * scale).to(x.dtype)


def fake_float8_per_token(x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    with torch.no_grad():
        scale = _float8_scale(x32)
    return (_CastThrough.apply((x32 / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX)) * scale).to(x.dtype)


def fake_activations(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if scheme.activations == "int8":
        return fake_int8_per_token(x)
    if scheme.activations == "float8":
        return fake_float8_per_token(x)
    return x
