"""The Llama decoder as plain PyTorch: no process groups, no parallelism, no precision policy.

Parallelism is applied from outside (parallel/), so module names here are the state-dict names of our
checkpoints: tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1,w2,w3},
layers.{i}.{attention_norm,ffn_norm}, norm, output (absent when tied to tok_embeddings).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.args import ModelArgs
from trainer.model.kv_cache import KVCache, LayerCache
from trainer.model.rope import apply_rope, rope_tables


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq, heads, head_dim) queries and keys before RoPE: unchanged in Llama."""
        return q, k

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        """cos/sin are the whole RoPE tables: sliced here, where the full sequence length is known even
        when the residual stream around this module is split over sequence-parallel ranks. With a cache
        (generation), x holds the positions from `start` on and attends to the cached ones as well."""
        batch, seq, _ = x.shape
        cos, sin = cos[start : start + seq], sin[start : start + seq]
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None
        if cache is not None:
            k, v = cache.append(k, v)
            # Query i (position start + i) sees keys 0 .. start + i; the causal mask, shifted by start.
            mask = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
        repeats = q.shape[1] // k.shape[1]
        if repeats > 1:  # grouped-query attention: each kv head serves `repeats` query heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention: type[Attention] = Attention):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0) -> torch.Tensor:
        # Keywords: tensor parallelism's input preparation counts the positional inputs.
        h = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, start=start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    # A family whose blocks differ only in attention (Qwen3's QK-norm) subclasses this and sets it.
    attention = Attention

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer id keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, self.attention) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        # Tied: no module of its own. A shared Parameter would be split in two by to_empty() and by
        # sharding, so the projection reads the embedding's weight directly instead.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # False: forward stops at the final norm and the loss projects onto the vocabulary itself, a
        # chunk of tokens at a time (trainer/loss.py), so the whole batch's logits never exist.
        self.project = True
        # Derived from args, never saved: rebuilt by init_buffers() after the model leaves the meta device.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)

    def init_buffers(self) -> None:
        a = self.args
        cos, sin = rope_tables(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=self.rope_cos.device)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab). A pipeline stage holds a subset of the
        modules (the others are None): it then maps hidden states to hidden states. With a cache
        (generation, one process), tokens continue what the cache has seen, and extend it."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if cache is None:
            for layer in self.layers.values():
                h = layer(h, self.rope_cos, self.rope_sin)
        else:
            for layer_id, layer in self.layers.items():
                h = layer(h, self.rope_cos, self.rope_sin, cache=cache.layers[layer_id], start=cache.length)
            cache.length += tokens.shape[1]
        if self.norm is None:  # a pipeline stage before the last
            return h
        h = self.norm(h)
        if not self.project:
            return h
        if self.args.tie_embeddings:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight (the embedding's when tied). Read right after forward, under
        FSDP it is the gathered weight: the root unit, which holds it, keeps it until backward."""
        return self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight


# ---- what the Llama family's registry entry (trainer/model/family.py) takes from here ----------------

# adapters.targets short names -> module-name patterns.
ADAPTER_TARGETS = {
    "q": r"layers\.\d+\.attention\.wq", "k": r"layers\.\d+\.attention\.wk", "v": r"layers\.\d+\.attention\.wv",
    "o": r"layers\.\d+\.attention\.wo", "gate": r"layers\.\d+\.feed_forward\.w1",
    "up": r"layers\.\d+\.feed_forward\.w3", "down": r"layers\.\d+\.feed_forward\.w2", "output": r"output",
}


def init_std(name: str, args: ModelArgs) -> float | None:
    """The init std of a parameter; None means "fill with ones" (norm weights)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        # Residual-branch outputs shrink with depth so the residual stream's variance stays bounded.
        return 0.02 / math.sqrt(2 * args.n_layers)
    if name == "output.weight" or (name == "tok_embeddings.weight" and args.tie_embeddings):
        return args.dim**-0.5
    return 0.02


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
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


def hf_extra_args(config: dict, head_dim: int) -> dict:
    """ModelArgs fields a Hugging Face LlamaConfig implies beyond the shared ones (none); raises
    ValueError for what Llama's shape cannot hold."""
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ValueError("head_dim x heads != hidden_size is not supported for Llama")
    return {}
