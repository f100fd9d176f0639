"""The dense block (pre-norm attention + SwiGLU MLP) and what a family of such blocks answers about it:
initialisation, FLOPs, activation memory, the sizes tensor parallelism splits, adapter target names.
Llama and Qwen3 share all of it; a family with other blocks (experts) answers these itself."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.common.attention import Attention
from models.common.kv_cache import LayerCache
from models.common.masking import WindowMask


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DenseBlock(nn.Module):
    def __init__(self, args, attention: type[Attention] = Attention):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0, mask: WindowMask | None = None) -> torch.Tensor:
        # Keywords: tensor parallelism's input preparation counts the positional inputs.
        h = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, start=start, mask=mask)
        return h + self.feed_forward(self.ffn_norm(h))


# adapters.targets short names -> module-name patterns.
ADAPTER_TARGETS = {
    "q": r"layers\.\d+\.attention\.wq", "k": r"layers\.\d+\.attention\.wk", "v": r"layers\.\d+\.attention\.wv",
    "o": r"layers\.\d+\.attention\.wo", "gate": r"layers\.\d+\.feed_forward\.w1",
    "up": r"layers\.\d+\.feed_forward\.w3", "down": r"layers\.\d+\.feed_forward\.w2", "output": r"output",
}


def init_std(name: str, args) -> float | None:
    """The init std of a parameter; None means "fill with ones" (norm weights)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        # Residual-branch outputs shrink with depth so the residual stream's variance stays bounded.
        return 0.02 / math.sqrt(2 * args.n_layers)
    if name == "output.weight" or (name == "tok_embeddings.weight" and args.tie_embeddings):
        return args.dim**-0.5
    return 0.02


def flops_per_token(args, seq_len: int) -> int:
    """Training FLOPs per token: 6 x (parameters used in matmuls) + 12 x layers x dim x seq_len (attention).

    The embedding lookup is no matmul, so it is left out; the output projection is one, so it counts
    even when it shares its weight with the embedding.
    """
    per_layer = (
        2 * args.dim * args.n_heads * args.head_dim
        + 2 * args.dim * args.n_kv_heads * args.head_dim
        + 3 * args.dim * args.hidden_dim
        + 2 * args.dim
    )
    matmul_params = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len


def activation_elements(args, ac_mode: str, every: int) -> float:
    """Elements a block saves for backward per token, by activation-checkpointing mode. Without it: the
    block input and norm outputs (4 x dim), q/k before and after RoPE (2 x (dim + kv_dim)), attention's
    q, k, v and output (4 x dim), the output projection's input (dim), SwiGLU's four hidden-size tensors."""
    kv = args.n_kv_heads * args.head_dim
    full = 11 * args.dim + 2 * kv + 4 * args.hidden_dim
    if ac_mode == "full":
        return args.dim  # only the block input; one block's activations exist at a time during recompute
    if ac_mode == "selective_layer":
        return (args.dim + (every - 1) * full) / every
    if ac_mode == "selective_op":
        return 4 * args.dim + 2 * kv + 2 * args.hidden_dim  # matmul and attention outputs, the block input
    return full


def tp_sizes(args) -> dict[str, int]:
    """The sizes tensor parallelism splits, by the model.* name a user would change: heads and MLP columns."""
    return {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "ffn_hidden_dim": args.hidden_dim}

