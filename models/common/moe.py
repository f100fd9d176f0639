"""A mixture-of-experts feed-forward layer: a router scores every expert for each token, the top-k experts
each transform the token (a SwiGLU of their own), and their outputs are summed with the router's weights.

Dropless: every token reaches all k of its experts, however uneven the load (no capacity factor). Tokens
are sorted by expert so that each expert's tokens are contiguous, and each projection is one grouped
matmul over all experts (`torch._grouped_mm`, which runs on CPU and CUDA in torch 2.13) rather than a
Python loop of small matmuls; the loop stays as the reference the tests hold the grouped path to.

Routing follows Qwen3-MoE (as transformers computes it): softmax over the experts in float32, top-k, and
with norm_topk_prob the k weights renormalised to sum to 1. Each forward leaves its routing statistics on
the module (`last_stats`) for the load-balancing loss and the expert-load metrics.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterStats:
    """One MoE layer's routing in one forward."""

    probs_sum: torch.Tensor  # (experts,) float32 router probabilities summed over tokens (differentiable)
    counts: torch.Tensor  # (experts,) how many of the tokens' top-k choices went to each expert
    tokens: int  # the tokens routed


def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """The Switch Transformer auxiliary loss as transformers computes it for Qwen3-MoE: over all layers
    together, num_experts x sum over experts of (share of top-k choices) x (mean router probability), each
    averaged over every layer's tokens. Even load gives top_k; the gradient reaches the router through the
    probabilities."""
    rows = sum(s.tokens for s in stats)
    chosen = torch.stack([s.counts.float() for s in stats]).sum(0) / rows
    probs = torch.stack([s.probs_sum for s in stats]).sum(0) / rows
    return num_experts * (chosen * probs).sum()


class GroupedExperts(nn.Module):
    """num_experts SwiGLU MLPs whose weights are stacked: w1, w3 (experts, hidden, dim), w2 (experts, dim,
    hidden), each expert's slice oriented as an nn.Linear weight."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, grouped: bool = True):
        super().__init__()
        self.num_experts, self.grouped = num_experts, grouped
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (routed tokens, dim), sorted by expert, counts[e] of them for expert e -> (routed tokens, dim)."""
        if self.grouped and _grouped_mm_fits(x, self.w1):
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            gate = torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offsets)
            return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offsets)
        return self.loop(x, counts)

    def loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The reference: one expert at a time."""
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = x[start : start + n]
            out.append(F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e]))
            start += n
        return torch.cat(out)


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The grouped kernel wants rows of whole 16-byte units, and the weights in the activations' dtype."""
    unit = 16 // x.element_size()
    return x.dtype == w.dtype and x.shape[-1] % unit == 0 and w.shape[1] % unit == 0


class MoE(nn.Module):
    """router (experts x dim, as transformers' gate) and the experts; forward (batch, seq, dim) -> the same."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 grouped: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = GroupedExperts(num_experts, dim, hidden_dim, grouped)
        self.last_stats: RouterStats | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, dim) -> (weights (tokens, k) in x's dtype, experts (tokens, k), probabilities (tokens, experts))."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, probs = self.route(x)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # every (token, choice) pair, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k
        routed = self.experts(x[token], counts) * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token, routed)
        self.last_stats = RouterStats(probs_sum=probs.sum(0), counts=counts, tokens=x.shape[0])
        return out.reshape(shape)
