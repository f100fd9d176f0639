"""A mixture-of-experts feed-forward layer: a router scores every expert for each token, the top-k experts
each transform the token (a SwiGLU of their own), and their outputs are summed with the router's weights.

Dropless: every token reaches all k of its experts, however uneven the load (no capacity factor). Tokens
are sorted by expert so that each expert's tokens are contiguous, and each projection is one grouped
matmul over all experts (`torch._grouped_mm`, which runs on CPU and CUDA in torch 2.13) rather than a
Python loop of small matmuls; the loop stays as the reference the tests hold the grouped path to.

Two routings (models/common/router.py), each as its reference computes it: Qwen3-MoE's softmax top-k,
balanced by an auxiliary loss, and DeepSeek-V3's sigmoid scores with group-limited choice, shared experts
and a per-expert bias that balances the load without a loss. Each forward leaves its routing statistics
on the module (`last_stats`) for the loss, the bias update and the expert-load metrics.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.common.dense import FeedForward
from models.common.router import Routing, route


@dataclass
class RouterStats:
    """One MoE layer's routing in one forward."""

    probs_sum: torch.Tensor  # (experts,) float32 router probabilities summed over tokens (differentiable)
    counts: torch.Tensor  # (experts,) how many of the tokens' top-k choices went to each expert
    tokens: int  # the tokens routed
    entropy_sum: torch.Tensor  # () the router distributions' entropies summed over tokens (no gradient)


def load_balancing_loss(stats: list[RouterStats], num_experts: int, counts: torch.Tensor | None = None,
                        rows: int | None = None) -> torch.Tensor:
    """The Switch Transformer auxiliary loss as transformers computes it for Qwen3-MoE: over all layers
    together, num_experts x sum over experts of (share of top-k choices) x (mean router probability), each
    averaged over every layer's tokens. Even load gives top_k; the gradient reaches the router through the
    probabilities.

    `counts` and `rows` (the choices per expert and the rows of every rank whose tokens are balanced
    together: data- and context-parallel ranks) make each rank's part of the loss, from its own
    probabilities; the parts sum to the loss of all those tokens, value and gradient."""
    if rows is None:
        rows = sum(s.tokens for s in stats)
    if counts is None:
        counts = torch.stack([s.counts.float() for s in stats]).sum(0)
    probs = torch.stack([s.probs_sum for s in stats]).sum(0) / rows
    return num_experts * (counts.float() / rows * probs).sum()


class Rounding(Protocol):
    """How stacked experts round their weights and each projection's input (quantization-aware training:
    trainer/qat/layers.py), where they do: the one contract between converters over the experts, as
    models/common/linear.py's product is for linear layers."""

    def weight(self, w: torch.Tensor) -> torch.Tensor: ...  # (experts, out, in): each expert's as a linear's

    def inputs(self, x: torch.Tensor) -> torch.Tensor: ...  # (rows, features): each row (token) alone


class GroupedExperts(nn.Module):
    """num_experts SwiGLU MLPs whose weights are stacked: w1, w3 (experts, hidden, dim), w2 (experts, dim,
    hidden), each expert's slice oriented as an nn.Linear weight."""

    rounding: Rounding | None = None  # set by a converter on the instance

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, grouped: bool = True):
        super().__init__()
        self.num_experts, self.grouped = num_experts, grouped
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) of the experts this rank runs, rounded where they round (adapters fold their updates
        in here)."""
        return self.round_weight(local(self.w1)), self.round_weight(local(self.w2)), self.round_weight(local(self.w3))

    def round_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.rounding is None else self.rounding.weight(w)

    def round_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rounding is None else self.rounding.inputs(x)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (routed tokens, dim), sorted by expert, counts[e] of them for expert e -> (routed tokens, dim)."""
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            # torch 2.13 traces the grouped matmul for bfloat16 only (its fake kernel refuses other dtypes):
            # other dtypes run it eagerly, a graph break in the compiled block.
            return _eager(self._compute, x, counts)
        return self._compute(x, counts)

    def _compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self.weights()
        # No rows (an expert-parallel rank nobody sent tokens to): the loop, whose empty matmuls still give
        # the weights their (zero) gradients, which the grouped kernel's backward cannot.
        if self.grouped and x.shape[0] > 0 and _grouped_mm_fits(x, w1):
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            x = self.round_inputs(x)
            gate = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets)
            up = torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets)
            hidden = self.round_inputs(F.silu(gate) * up)
            return torch._grouped_mm(hidden, w2.transpose(-2, -1), offs=offsets)
        return self.loop(x, counts, (w1, w2, w3))

    def loop(self, x: torch.Tensor, counts: torch.Tensor, weights=None) -> torch.Tensor:
        """The reference: one expert at a time."""
        w1, w2, w3 = weights or self.weights()
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = self.round_inputs(x[start : start + n])
            out.append(F.linear(self.round_inputs(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e])), w2[e]))
            start += n
        return torch.cat(out)


@torch.compiler.disable
def _eager(fn, *args):
    return fn(*args)


def local(w: torch.Tensor) -> torch.Tensor:
    """A weight as this rank computes with it: expert parallelism makes the stacked weights DTensors
    sharded over the experts, and each rank runs the experts it holds on the tokens sent to it."""
    return w.to_local() if hasattr(w, "to_local") else w


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The grouped kernel wants rows of whole 16-byte units, and the weights in the activations' dtype."""
    unit = 16 // x.element_size()
    return x.dtype == w.dtype and x.shape[-1] % unit == 0 and w.shape[1] % unit == 0


class MoE(nn.Module):
    """router (experts x dim, as transformers' gate), the routed experts, and DeepSeek-V3's shared experts
    (a dense SwiGLU every token passes through) when routing.shared_experts > 0; forward (batch, seq, dim)
    -> the same. With routing.expert_bias, `expert_bias` (a saved buffer, trained by the load-balancing
    update rather than by gradients) is added to the scores for the choice of experts only."""

    def __init__(self, dim: int, hidden_dim: int, routing: Routing, grouped: bool = True):
        super().__init__()
        self.routing = routing
        self.num_experts, self.top_k = routing.num_experts, routing.top_k
        self.router = nn.Linear(dim, routing.num_experts, bias=False)
        self.experts = GroupedExperts(routing.num_experts, dim, hidden_dim, grouped)
        self.shared = FeedForward(dim, hidden_dim * routing.shared_experts) if routing.shared_experts else None
        if routing.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(routing.num_experts))
        else:
            self.expert_bias = None
        # Expert parallelism (parallel/ep.py) replaces this with the all-to-all exchange of tokens between
        # the ranks that hold the experts: (tokens sorted by expert, counts per expert) -> expert outputs.
        self.dispatch = None
        self.last_stats: RouterStats | None = None

    def init_buffers(self) -> None:
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (tokens, dim) -> (weights (tokens, k) in x's dtype, experts (tokens, k), probabilities (tokens, experts))."""
        weights, experts, probs = route(self.router, x, self.routing, self.expert_bias)
        return weights.to(x.dtype), experts, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, probs = self.route(x)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # every (token, choice) pair, grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.top_k
        grouped = x[token]
        expert_out = self.experts(grouped, counts) if self.dispatch is None else self.dispatch(self.experts, grouped, counts)
        routed = expert_out * weights.flatten()[order].unsqueeze(-1)
        # Filled through a flat view, so the layer returns a tensor of its own rather than a view (an FSDP unit's
        # output must not be one: an in-place op on it would skip its backward hook).
        out = x.new_zeros(shape)
        out.view_as(x).index_add_(0, token, routed)
        if self.shared is not None:
            out = out + self.shared(x).view(shape)
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum()
        self.last_stats = RouterStats(probs_sum=probs.sum(0), counts=counts, tokens=x.shape[0], entropy_sum=entropy)
        return out
