"""Which experts each token goes to, and with what weight: the routings of the mixture-of-experts layer
(models/common/moe.py), each as its reference computes it.

- softmax (Qwen3-MoE, Mixtral): softmax over the experts in float32, top-k, and with norm_topk_prob the k
  weights renormalised to sum to 1. Balanced by the auxiliary loss (trainer/router_balance.py).
- sigmoid (DeepSeek-V3): an independent sigmoid score per expert, in float32. The experts are split into
  groups, a token may only choose among its topk_group best groups (each group scored by its two best
  experts), and the top-k are chosen on the scores plus a per-expert bias; the weights are the scores
  without the bias, renormalised if asked, times routed_scaling_factor. The bias balances the load
  without a loss term: after each step it moves each expert's bias toward even load.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    score_func: str = "softmax"  # softmax | sigmoid
    groups: int = 1  # sigmoid: expert groups (DeepSeek-V3's n_group) ...
    topk_groups: int = 1  # ... of which a token may choose among the best topk_groups
    scaling: float = 1.0  # sigmoid: the weights' factor (DeepSeek-V3's routed_scaling_factor)
    expert_bias: bool = False  # a per-expert bias added to the scores for the choice only
    shared_experts: int = 0  # experts every token passes through (their hidden sizes summed into one MLP)

    def __post_init__(self):
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"router score function {self.score_func!r} is not softmax or sigmoid")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be between 1 and the number of experts ({self.num_experts})")
        if self.num_experts % self.groups or not 0 < self.topk_groups <= self.groups:
            raise ValueError(f"{self.num_experts} experts do not split into {self.groups} groups of which "
                             f"{self.topk_groups} are chosen")
        if self.groups > 1 and self.num_experts // self.groups < 2:
            raise ValueError("each expert group needs 2 experts or more (a group is scored by its best two)")
        if self.groups > 1 and self.top_k > self.topk_groups * (self.num_experts // self.groups):
            raise ValueError(f"top_k {self.top_k} exceeds the experts of {self.topk_groups} groups")


def route(router: nn.Linear, x: torch.Tensor, routing: Routing, bias: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (tokens, dim) -> (weights (tokens, k) float32, experts (tokens, k), probabilities (tokens, experts)
    float32: the distribution the auxiliary loss and the entropy metric read)."""
    if routing.score_func == "softmax":
        probs = F.softmax(router(x).float(), dim=-1)
        weights, experts = torch.topk(probs, routing.top_k, dim=-1)
        if routing.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs
    # DeepSeek-V3 computes its router in float32 whatever the model's dtype (a router an adapter wraps
    # computes its own way).
    logits = F.linear(x.float(), router.weight.float()) if type(router) is nn.Linear else router(x).float()
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias
    if routing.groups > 1:
        per_group = choice.view(-1, routing.groups, routing.num_experts // routing.groups)
        group_scores = per_group.topk(2, dim=-1)[0].sum(-1)
        best = group_scores.topk(routing.topk_groups, dim=-1, sorted=False)[1]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(routing.num_experts // routing.groups, dim=1), float("-inf"))
    experts = choice.topk(routing.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, experts)
    if routing.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scaling, experts, scores / scores.sum(dim=-1, keepdim=True)

