"""Multi-head attention with grouped-query keys and values and RoPE, through SDPA: the attention of the
dense families. A family whose attention differs only before RoPE (Qwen3's per-head norms) overrides
normalize_qk; one that differs more brings its own module."""

import torch
import torch.nn.functional as F
from torch import nn

from models.common.kv_cache import LayerCache
from models.common.masking import WindowMask
from models.common.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq, heads, head_dim) queries and keys before RoPE: unchanged here."""
        return q, k

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0, mask: WindowMask | None = None) -> torch.Tensor:
        """cos/sin are the whole RoPE tables: sliced here, where the full sequence length is known even
        when the residual stream around this module is split over sequence-parallel ranks. With a cache
        (generation), x holds the positions from `start` on and attends to the cached ones as well. With
        a mask (packed documents, context parallelism), the mask says the positions and the keys."""
        batch, seq, _ = x.shape
        cos, sin = mask.rope(cos, sin) if mask is not None else (cos[start : start + seq], sin[start : start + seq])
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is not None:
            out = mask.attend(q, k, v)
        else:
            causal = None
            if cache is not None:
                k, v = cache.append(k, v)
                # Query i (position start + i) sees keys 0 .. start + i; the causal mask, shifted by start.
                causal = torch.ones(seq, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=start)
            # Grouped-query attention: each kv head serves several query heads, read in place by SDPA
            # (enable_gqa) rather than repeated into copies (docs/performance.md measures the saving).
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
