"""Document-aware attention on one process: a packed window's documents each give the logits they give
alone (fp32, 1e-5), for Llama and Qwen3 and with a window that starts inside a document; FlexAttention's
block mask equals SDPA's boolean mask; grouped-query attention through enable_gqa equals repeated keys and
values. The oracle for "alone" is the same model on the document by itself, causal, from position 0."""

import pytest
import torch
import torch.nn.functional as F

from models.common.masking import WindowMask, document_positions
from tests.helpers import build_adapted, flavor_args
from trainer.config.schema import AdaptersConfig

VOCAB = 320


def _model(flavor: str):
    args = flavor_args(flavor, vocab_size=VOCAB, max_seq_len=256)
    torch.manual_seed(0)
    model = build_adapted(args, AdaptersConfig(), init_from=None, seed=0).eval()
    return model


def _packed(lengths_per_row: list[list[int]], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for lengths in lengths_per_row:
        rows.append(torch.randint(0, VOCAB, (sum(lengths),), generator=generator))
        docs.append(torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]))
    return torch.stack(rows), torch.stack(docs)


@pytest.mark.parametrize("flavor", ["debug", "qwen3_debug"])
def test_every_packed_document_gives_its_logits_alone(flavor):
    model = _model(flavor)
    lengths = [[40, 1, 70, 17], [128]]
    tokens, documents = _packed(lengths)
    with torch.no_grad():
        packed = model(tokens, documents=documents)
        worst = 0.0
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model(tokens[row : row + 1, start : start + n])
                worst = max(worst, (packed[row, start : start + n] - alone[0]).abs().max().item())
                start += n
        # The plain causal path leaks across documents: the second document differs.
        leaked = (model(tokens)[0, 41:111] - packed[0, 41:111]).abs().max().item()
    print(f"\n{flavor}: packed vs alone max |diff| {worst:.2e}; causal leak {leaked:.2e}")
    assert worst < 1e-5
    assert leaked > 1e-3


def test_positions_restart_at_each_document_and_ids_need_not_be_sorted():
    documents = torch.tensor([[3, 3, 3, 0, 0, 7, 7, 7, 7, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], list(range(10))]


def test_flex_block_mask_equals_the_sdpa_mask():
    # FlexAttention has no backward on CPU (torch 2.13): compared forward here, trained through on CUDA.
    generator = torch.Generator().manual_seed(0)
    _, documents = _packed([[50, 14, 64], [1, 127]])
    q = torch.randn(2, 8, 128, 32, generator=generator)
    k, v = (torch.randn(2, 2, 128, 32, generator=generator) for _ in range(2))
    sdpa = WindowMask.build(documents, seq=128, kernel="sdpa").attend(q, k, v)
    flex = WindowMask.build(documents, seq=128, kernel="flex").attend(q, k, v)
    diff = (sdpa - flex).abs().max().item()
    print(f"\nflex vs sdpa: {diff:.2e}")
    assert diff < 1e-6


def test_enable_gqa_equals_repeated_keys_and_values():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 96, 32, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 96, 32, generator=generator, requires_grad=True) for _ in range(2))
    grouped = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    (gq, gk, gv) = torch.autograd.grad(grouped.square().sum(), (q, k, v))
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    (rq, rk, rv) = torch.autograd.grad(repeated.square().sum(), (q, k, v))
    assert (grouped - repeated).abs().max() < 1e-6
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert (a - b).abs().max() < 1e-5
