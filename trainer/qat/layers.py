"""The fake-quantized layers QAT swaps in, and which layers it swaps.

QATLinear and QATEmbedding are nn.Linear / nn.Embedding with the same parameters under the same names, so
checkpoints hold plain high-precision weights (a run with QAT off resumes them, and exports read them as
any other); only the forward rounds, through trainer/qat/schemes.py. set_fake_quant switches the
rounding (qat.start_step); off, a layer is exactly its plain self. A mixture's stacked experts keep their
class: they get a rounding (models/common/moe.py's seam) that rounds each expert's weights as a linear
layer's and each projection's input per token, in the grouped matmul and the reference loop alike.

Adapters wrap what QAT leaves (model.converters order): the frozen product of a LoRA / DoRA layer over a
QATLinear is fake-quantized through the product seam (models/common/linear.py), the adapters' own small
matmuls stay in high precision, as QAT + LoRA recipes do. Over experts the adapters' updates are folded
into the weights (trainer/adapters/experts.py): the base's weights round before the update is added, and
each projection's input rounds for the whole product.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.common.linear import product_of, set_product
from models.common.moe import GroupedExperts
from trainer.config.schema import QATConfig
from trainer.qat.schemes import Scheme, fake_activations, fake_weight


class QATRounding:
    """The scheme's rounding of a layer's weights and inputs while `on`: a linear layer's product x @ W.T
    (models/common/linear.py) and stacked experts' rounding (models/common/moe.py) both. It holds the
    switch, so that an adapter layer that took the product (or the experts) over follows it too."""

    def __init__(self, scheme: Scheme, group_size: int, round_weights: bool = True):
        self.scheme, self.group_size, self.on = scheme, group_size, True
        # False for weights read back from a quantized export: on the grid already (and rounding an
        # int4 group again is not the identity: its largest value sits below the range).
        self.round_weights = round_weights

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """A linear weight (out, in), or stacked experts' (experts, out, in): each row rounds alone."""
        if not (self.on and self.round_weights):
            return w
        return fake_weight(w.reshape(-1, w.shape[-1]), self.scheme, self.group_size).reshape(w.shape)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return fake_activations(x, self.scheme) if self.on else x

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.inputs(x), self.weight(weight))

    def __repr__(self) -> str:
        return f"fake-quantized {self.scheme.name}" + ("" if self.round_weights else " (inputs; weights stored quantized)")


class QATLinear(nn.Linear):
    @classmethod
    def swap(cls, layer: nn.Linear, scheme: Scheme, group_size: int, round_weights: bool = True) -> "QATLinear":
        layer.__class__ = cls  # same parameters, same names, same TP styles (an nn.Linear)
        set_product(layer, QATRounding(scheme, group_size, round_weights))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = product_of(self)(x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {product_of(self)}"


class QATEmbedding(nn.Embedding):
    """Weight-only: a lookup has no activations to round. Each row is grouped as a linear layer's is."""

    scheme: Scheme
    group_size: int
    fake_quant: bool

    @classmethod
    def swap(cls, layer: nn.Embedding, scheme: Scheme, group_size: int) -> "QATEmbedding":
        layer.__class__ = cls
        layer.scheme, layer.group_size, layer.fake_quant = scheme, group_size, True
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = fake_weight(self.weight, self.scheme, self.group_size) if self.fake_quant else self.weight
        return F.embedding(tokens, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.scheme.name}"


def chosen_layers(model: nn.Module, cfg: QATConfig) -> dict[str, str | None]:
    """name -> None for each linear layer / embedding that QAT rounds, or the reason it stays (of a plain
    model, or of one QAT converted)."""
    chosen = {}
    for name, module in model.named_modules():
        if type(module) in (nn.Embedding, QATEmbedding):
            chosen[name] = None if cfg.embeddings else "the token embeddings (qat.embeddings=false)"
        elif isinstance(module, GroupedExperts):
            chosen[name] = None  # each expert's projections, as linear layers (served quantized alike)
        elif type(module) not in (nn.Linear, QATLinear):
            continue
        elif not name.startswith("layers."):
            chosen[name] = None if cfg.head else "the output head (qat.head=false)"
        elif name.endswith(".router"):
            # Its scores choose each token's experts; served routers stay in high precision too.
            chosen[name] = "a mixture-of-experts router (its scores choose the experts)"
        else:
            chosen[name] = None
    return chosen


def round_experts(experts: GroupedExperts, scheme: Scheme, group_size: int, round_weights: bool = True) -> None:
    """Stacked experts round as linear layers do: each expert's weights, and each projection's input."""
    experts.rounding = QATRounding(scheme, group_size, round_weights)


def rounding_of(layer: nn.Module) -> QATRounding | None:
    """A linear layer's or stacked experts' QAT rounding, if it has one."""
    rounding = product_of(layer) if not isinstance(layer, GroupedExperts) else layer.rounding
    return rounding if isinstance(rounding, QATRounding) else None


def qat_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that round: QAT's own, adapter layers computing their frozen product through QAT, and
    stacked experts (adapted or not)."""
    return [m for m in model.modules() if rounding_of(m) is not None or isinstance(m, QATEmbedding)]


def set_fake_quant(model: nn.Module, on: bool) -> None:
    for layer in qat_layers(model):
        if isinstance(layer, QATEmbedding):
            layer.fake_quant = on
        else:
            rounding_of(layer).on = on
