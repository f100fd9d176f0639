"""Context parallelism: each rank of the `cp` mesh dimension holds a slice of every sequence, so the
longest sequence is no longer what one device's activations allow.

Load balance: the window is cut into 2 x cp chunks and rank r holds chunks r and 2cp-1-r, so under causal
attention every rank has the same number of (query, key) pairs to compute (an early chunk sees few keys,
its partner at the end many). Attention across slices: every rank gathers the keys and values of the
whole window (all-gather; reduce-scatter of their gradients in the backward) and attends its own queries
to them under a mask of global positions: Llama 3's approach, which composes with document masks as they
are, since a document may span slices. Keys and values are the small side of grouped-query attention
(8 kv heads against 32 query heads in Llama 3), so gathering them costs less than passing blocks around a
ring would save; everything else (embeddings, norms, MLPs, the loss) runs on the rank's own tokens.
FSDP shards parameters over dp_shard x cp (parallel/mesh.py): cp ranks hold different tokens of the same
sequences, so their gradients are summed like data-parallel ranks'.
"""

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh


# all_gather_single_autograd from torch 2.13 on; the name it replaced before (the GPU machine has 2.11).
_all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def chunk_index(window: int, rank: int, cp: int, device=None) -> torch.Tensor:
    """Positions in the window that rank `rank` holds: chunks rank and 2cp-1-rank of 2 x cp."""
    chunk = window // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(t: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """(batch, window, ...) -> (batch, window / cp, ...): this rank's slice, in chunk_index's order."""
    return t[:, chunk_index(t.shape[1], rank, cp, t.device)]


class ContextParallel:
    """What a decoder asks of its context-parallel rank (models/common/decoder.py: window_mask)."""

    def __init__(self, mesh: DeviceMesh):
        self.mesh, self.size, self.rank = mesh, mesh.size(), mesh.get_local_rank()

    def query_index(self, window: int, device) -> torch.Tensor:
        return chunk_index(window, self.rank, self.size, device)

    def key_index(self, window: int, device) -> torch.Tensor:
        """Positions of the gathered keys: every rank's slice, in rank order (what the all-gather yields)."""
        return torch.cat([chunk_index(window, r, self.size, device) for r in range(self.size)])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, this rank's tokens, head_dim) -> every rank's tokens, rank after rank. Through
        functional collectives: differentiable (the backward reduce-scatters) and traceable by compile."""
        return _all_gather(x.contiguous(), gather_dim=2, group=self.mesh.get_group())


def apply_cp(model, mesh: DeviceMesh) -> None:
    """The model (or pipeline stage) attends over sequences split across the mesh's ranks."""
    model.context_parallel = ContextParallel(mesh)
