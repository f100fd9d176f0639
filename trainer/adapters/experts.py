"""LoRA and DoRA over a mixture of experts' stacked weights (models/common/moe.py: GroupedExperts).

Each expert gets low-rank updates of its own, laid out as peft lays them out over transformers'
Qwen3-MoE experts (peft's `target_parameters`, whose export this matches): one over the fused gate and up
projections, whose A is shared by both (w1 and w3 are the two halves of transformers' gate_up_proj), one
over the down projection (w2). So per expert e, with s = alpha / rank (alpha / sqrt(rank) for rsLoRA):

    [w1_e; w3_e] += s * B_gate_up[e] @ A_gate_up[e]        w2_e += s * B_down[e] @ A_down[e]

The updates are folded into the weights each forward (a batched matmul per projection, as peft does for
these parameters) and the grouped matmul then runs as without adapters; expert parallelism splits the
adapter tensors by expert with the weights. DoRA rescales each expert's rows of the updated weights to a
learned magnitude, the norm detached as for linear layers (trainer/adapters/lora.py). Dropout cannot be
applied to an update folded into the weights, so it is refused for experts (peft refuses it too).
"""

import math

import torch
from torch import nn

from models.common.moe import GroupedExperts, local
from parallel.placement import gather_full


class LoRAExperts(GroupedExperts):
    def __init__(self, base: GroupedExperts, *, rank: int, alpha: float, rslora: bool, dora: bool):
        nn.Module.__init__(self)  # not GroupedExperts': the weights are the base's, not new ones
        self.num_experts, self.grouped = base.num_experts, base.grouped
        self.w1, self.w2, self.w3 = base.w1, base.w2, base.w3  # the frozen base, under its own names
        self.rounding = base.rounding  # QAT's, where it converted the base first: the base rounds, the updates not
        experts, hidden, dim = base.w1.shape
        device = base.w1.device

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(experts, *shape, device=device))

        self.lora_a_gate_up, self.lora_b_gate_up = empty(rank, dim), empty(2 * hidden, rank)
        self.lora_a_down, self.lora_b_down = empty(rank, hidden), empty(dim, rank)
        self.magnitude_gate_up = empty(2 * hidden) if dora else None
        self.magnitude_down = empty(dim) if dora else None
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank

    @property
    def dora(self) -> bool:
        return self.magnitude_down is not None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _merge(self, local, base=lambda w: self.round_weight(local(w)))

    def merged(self) -> dict[str, torch.Tensor]:
        """{w1, w2, w3}: the whole updated weights in float32, as an export writes them (gathers: every rank
        calls it)."""
        w1, w2, w3 = _merge(self, lambda t: gather_full(t).float())
        return {"w1": w1, "w2": w2, "w3": w3}

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "lora"
        return f"{kind}, rank={self.lora_a_down.shape[1]}, scale={self.scale:g}, experts={self.num_experts}"


def _merge(m: LoRAExperts, take, base=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w2, w3) with the updates folded in, each tensor read through `take` (this rank's experts, or
    the whole of them), the base's through `base` where given."""
    base = base or take
    gate_up = torch.cat([base(m.w1), base(m.w3)], dim=1) + m.scale * (take(m.lora_b_gate_up) @ take(m.lora_a_gate_up))
    down = base(m.w2) + m.scale * (take(m.lora_b_down) @ take(m.lora_a_down))
    if m.dora:
        gate_up = _rescaled(gate_up, take(m.magnitude_gate_up))
        down = _rescaled(down, take(m.magnitude_down))
    w1, w3 = gate_up.chunk(2, dim=1)
    return w1, down, w3


def _rescaled(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of `weight` (experts, out, in) scaled to `magnitude` (experts, out)."""
    norm = torch.linalg.norm(weight, dim=2, keepdim=True).detach()
    return magnitude.unsqueeze(2) * weight / norm


def peft_tensors(module: LoRAExperts, hf_experts: str) -> dict[str, torch.Tensor]:
    """The whole adapter as peft saves its `target_parameters` over transformers' experts module `hf_experts`
    (its gate_up_proj targeted first, then down_proj): the first wrapper is the inner one (`base_layer.`),
    A as (experts x rank, in) with each expert's rows together, B as (out, rank x experts) with the
    experts' columns interleaved (column j x experts + e is expert e's j-th)."""
    prefix = f"base_model.model.{hf_experts}"
    tensors = {}
    for which, where in (("gate_up", f"{prefix}.base_layer"), ("down", prefix)):
        a, b = (gather_full(getattr(module, f"lora_{ab}_{which}")) for ab in ("a", "b"))
        experts, rank, _ = a.shape
        tensors[f"{where}.lora_A.weight"] = a.reshape(experts * rank, -1)
        tensors[f"{where}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)
    return tensors
