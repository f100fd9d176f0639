"""Context parallelism's bookkeeping in one process: the load-balanced chunks cover every position once
and give every rank the same causal work, and attention of a rank's queries over the gathered keys (in
rank order) equals the rows of whole-sequence attention, causal and with documents. The real thing, over
gloo ranks against a single process, is in tests/distributed/test_parity_matrix.py."""

import pytest
import torch
import torch.nn.functional as F

from models.common.masking import WindowMask, document_positions
from parallel.cp import chunk_index


@pytest.mark.parametrize("cp", [2, 4])
def test_chunks_cover_the_window_once_and_balance_causal_work(cp):
    window = 64
    held = [chunk_index(window, r, cp) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(window))
    # Query i attends to i + 1 keys: every rank's sum is the same.
    work = {int((index + 1).sum()) for index in held}
    assert len(work) == 1


@pytest.mark.parametrize("documents", [None, [[0] * 20 + [1] * 30 + [2] * 14, [0] * 64]])
def test_a_ranks_queries_over_gathered_keys_equal_the_whole_sequences_rows(documents):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 16, generator=generator)
    k, v = (torch.randn(2, 2, 64, 16, generator=generator) for _ in range(2))
    docs = torch.tensor(documents) if documents is not None else None
    whole = WindowMask.build(docs, seq=64).attend(q, k, v) if docs is not None else \
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cp = 2
    keys = torch.cat([chunk_index(64, r, cp) for r in range(cp)])
    for rank in range(cp):
        mine = chunk_index(64, rank, cp)
        k_mine, v_mine = k[:, :, mine], v[:, :, mine]
        # What the all-gather returns: every rank's slice of keys (or values), rank after rank.
        gathered = {id(k_mine): k[:, :, keys], id(v_mine): v[:, :, keys]}
        mask = WindowMask.build(docs, seq=32, q_index=mine, kv_index=keys, gather=lambda x: gathered[id(x)])
        out = mask.attend(q[:, :, mine], k_mine, v_mine)
        assert (out - whole[:, :, mine]).abs().max() < 1e-6
        # RoPE: the queries' positions in the whole window, restarting at each document.
        want = (document_positions(docs) if docs is not None else torch.arange(64).unsqueeze(0))[:, mine]
        assert torch.equal(mask.positions, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_runs_without_a_mask_equal_masked_attention_forward_and_backward(dtype):
    """On CPU a cp rank's causal chunks attend through two flash calls each (prefix, causal block) merged
    by log-sum-exp, no mask: the same outputs and gradients as SDPA with the boolean mask."""
    from models.common.causal_runs import causal_runs_attention, runs_of

    generator = torch.Generator().manual_seed(1)
    q0 = torch.randn(2, 8, 32, 16, generator=generator).to(dtype)
    k0, v0 = (torch.randn(2, 2, 64, 16, generator=generator).to(dtype) for _ in range(2))
    mine = chunk_index(64, 0, 2)  # positions 0-15 and 48-63
    results = []
    for way in ("runs", "mask"):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        if way == "runs":
            out = causal_runs_attention(q, k, v, runs_of(mine))
        else:
            allowed = mine[:, None] >= torch.arange(64)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        out.float().square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(*results):
        assert (a.float() - b.float()).abs().max() < tolerance * max(1.0, b.float().abs().max().item())
