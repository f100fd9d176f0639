"""The decoder every family builds on, as plain PyTorch (no process groups, no precision policy): token
embeddings, blocks in a ModuleDict keyed by layer id, a final norm, and an output projection that may be
tied to the embedding. The family says what a block is.

Module names are the state-dict names of our checkpoints: tok_embeddings, layers.{i}.<the block's own>,
norm, output (absent when tied). A pipeline stage is this module with the other stages' modules set to
None (parallel/pp.py), so forward works on whatever a stage holds.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.common.kv_cache import KVCache
from models.common.masking import WindowMask
from models.common.rope import rope_tables


class Decoder(nn.Module):
    def __init__(self, args, block: Callable[[object, int], nn.Module]):
        """`block(args, layer_id)`: the family's transformer block for that layer."""
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer id keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): block(args, i) for i in range(args.n_layers)})
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        # Tied: no module of its own. A shared Parameter would be split in two by to_empty() and by
        # sharding, so the projection reads the embedding's weight directly instead.
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        # False: forward stops at the final norm and the loss projects onto the vocabulary itself, a
        # chunk of tokens at a time (trainer/loss.py), so the whole batch's logits never exist.
        self.project = True
        # How attention over packed documents runs: "sdpa" (a boolean mask; every device, with gradients)
        # or "flex" (FlexAttention's block mask; the trainer picks it on CUDA with compile on).
        self.attention_kernel = "sdpa"
        # Context parallelism (parallel/cp.py): which part of each sequence this rank holds, and the
        # gathering of every rank's keys and values. None: the rank holds whole sequences.
        self.context_parallel = None
        # Derived from args, never saved: rebuilt by init_buffers() after the model leaves the meta device.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)

    def init_buffers(self) -> None:
        a = self.args
        cos, sin = rope_tables(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=self.rope_cos.device)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        init_block_buffers(self.layers)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                documents: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab). A pipeline stage holds a subset of the
        modules (the others are None): it then maps hidden states to hidden states. With a cache
        (generation, one process), tokens continue what the cache has seen, and extend it. `documents`
        (batch, window): the document id of every token of the packed windows, each document attending
        only to itself; the whole windows even when this rank holds a context-parallel slice of them."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if cache is None:
            mask = self.window_mask(documents, tokens.shape[1], h.device)
            extra = {} if mask is None else {"mask": mask}  # blocks of other families may not take one
            for layer in self.layers.values():
                h = layer(h, self.rope_cos, self.rope_sin, **extra)
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

    def window_mask(self, documents: torch.Tensor | None, seq: int, device) -> WindowMask | None:
        """What attention needs beyond plain causal attention over whole sequences (None when nothing)."""
        cp = self.context_parallel
        if cp is None:
            if documents is None:
                return None
            return WindowMask.build(documents, seq=seq, kernel=self.attention_kernel)
        window = seq * cp.size
        return WindowMask.build(documents, seq=seq, kernel=self.attention_kernel, q_index=cp.query_index(window, device),
                                kv_index=cp.key_index(window, device), gather=cp.gather, device=device)

    def head_weight(self) -> torch.Tensor:
        """The output projection's weight (the embedding's when tied). Read right after forward, under
        FSDP it is the gathered weight: the root unit, which holds it, keeps it until backward."""
        return self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight


def init_block_buffers(module: nn.Module) -> None:
    """Sets the buffers of the blocks' modules that keep state of their own (a MoE layer's expert bias) to
    their initial values: to_empty() leaves them uninitialised, and no weight source holds them."""
    for m in module.modules():
        if m is not module and hasattr(m, "init_buffers"):
            m.init_buffers()
