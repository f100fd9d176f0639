"""Which keys each query of a window attends to, when that is more than plain causal attention over one
sequence held whole: packed documents (each token sees only the earlier tokens of its own document, and
RoPE positions restart at each document), a sequence split over context-parallel ranks (each rank holds
some of the queries and gathers every key), or both.

A `WindowMask` is built once per forward by the decoder and handed to every block's attention, which asks
it for the RoPE angles of its queries and for the attention itself. Two kernels give the same numbers
(tested within 1e-6): SDPA with a boolean mask, on every device and with gradients everywhere; and
FlexAttention with a block mask, which skips whole masked blocks and is fast only when compiled (it has
no backward on CPU, so training takes it only on CUDA with compile on). A context-parallel rank's causal
chunks on CPU need no mask at all (models/common/causal_runs.py).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.common.causal_runs import causal_runs_attention, runs_of

# A sequence slice's keys and values -> the whole sequence's, in the order of `kv_index`.
Gather = Callable[[torch.Tensor], torch.Tensor]


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """(batch, seq) document ids -> each token's offset from the first token of its document in the window."""
    index = torch.arange(documents.shape[1], device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


@dataclass
class WindowMask:
    q_index: torch.Tensor  # (q,) the queries' indices in the whole window
    kv_index: torch.Tensor  # (kv,) the keys' indices in the whole window, in the order attention sees them
    positions: torch.Tensor  # (batch or 1, q) the queries' RoPE positions
    documents: torch.Tensor | None  # (batch, window) document id of every token, or None: one document
    kernel: str  # "sdpa" or "flex"
    gather: Gather | None = None  # context parallelism: a rank's keys/values -> every rank's
    block_mask: object = None  # FlexAttention's BlockMask, made once per forward for every block
    # SDPA's (batch or 1, 1, q, kv) boolean mask, made once per forward: every layer shares it (and the
    # one copy autograd keeps for the backward).
    dense: torch.Tensor | None = None
    # Causal attention of a cp rank's chunks on CPU, with no mask (models/common/causal_runs.py): the
    # runs of consecutive positions the queries are, and the order that sorts the gathered keys.
    runs: list[tuple[int, int, int]] | None = None
    key_order: torch.Tensor | None = None

    @classmethod
    def build(cls, documents: torch.Tensor | None, *, seq: int, kernel: str = "sdpa", q_index: torch.Tensor | None = None,
              kv_index: torch.Tensor | None = None, gather: Gather | None = None, device=None) -> "WindowMask":
        """`seq`: the queries this rank holds. Without q_index they are the whole window, in order."""
        device = documents.device if documents is not None else device
        if q_index is None:
            q_index = torch.arange(seq, device=device)
        if kv_index is None:
            kv_index = q_index
        if documents is None:
            positions = q_index.unsqueeze(0)
        else:
            positions = document_positions(documents)[:, q_index]
        mask = cls(q_index, kv_index, positions, documents, kernel, gather)
        if kernel == "flex":
            mask.block_mask = _block_mask(mask)
        elif documents is None and q_index.device.type == "cpu":
            mask.runs, mask.key_order = runs_of(q_index), torch.argsort(kv_index)
        else:
            mask.dense = mask.allowed()
        return mask

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole (max_seq_len, head_dim) tables -> the queries' (batch or 1, q, head_dim) rows."""
        return cos[self.positions], sin[self.positions]

    def allowed(self) -> torch.Tensor:
        """(batch or 1, 1, q, kv) bool: True where a query may attend to a key."""
        allowed = self.q_index[:, None] >= self.kv_index[None, :]
        if self.documents is not None:
            q_docs, kv_docs = self.documents[:, self.q_index], self.documents[:, self.kv_index]
            allowed = allowed & (q_docs[:, :, None] == kv_docs[:, None, :])
        else:
            allowed = allowed.unsqueeze(0)
        return allowed.unsqueeze(1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (batch, heads, q, head_dim); k, v (batch, kv_heads, this rank's keys, head_dim) after RoPE."""
        if self.gather is not None:
            k, v = self.gather(k), self.gather(v)
        if self.runs is not None:
            return causal_runs_attention(q, k[:, :, self.key_order], v[:, :, self.key_order], self.runs)
        gqa = q.shape[1] != k.shape[1]
        if self.kernel == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            return flex_attention(q, k, v, block_mask=self.block_mask, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)


def _block_mask(mask: WindowMask):
    from torch.nn.attention.flex_attention import create_block_mask

    q_index, kv_index, documents = mask.q_index, mask.kv_index, mask.documents

    def mask_mod(b, h, qi, ki):
        allowed = q_index[qi] >= kv_index[ki]
        if documents is not None:
            allowed = allowed & (documents[b, q_index[qi]] == documents[b, kv_index[ki]])
        return allowed

    batch = documents.shape[0] if documents is not None else None
    return create_block_mask(mask_mod, batch, None, len(q_index), len(kv_index), device=q_index.device)
