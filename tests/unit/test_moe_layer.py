"""The mixture-of-experts layer (models/common/moe.py) against transformers' own Qwen3-MoE block and its
load-balancing loss (the oracle), and its grouped-matmul path against the per-expert loop. The family
built on it: tests/unit/test_qwen3_moe.py."""

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from models.common.moe import MoE, _grouped_mm_fits, load_balancing_loss
from models.common.router import Routing

DIM, HIDDEN, EXPERTS, TOP_K = 64, 48, 8, 2


def _pair(norm_topk_prob: bool):
    """transformers' block with random weights, and ours holding the same ones."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=HIDDEN, num_experts=EXPERTS,
                            num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob)
    theirs = Qwen3MoeSparseMoeBlock(config).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = MoE(DIM, HIDDEN, Routing(num_experts=EXPERTS, top_k=TOP_K, norm_topk_prob=norm_topk_prob))
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        gate, up = theirs.experts.gate_up_proj.chunk(2, dim=1)  # (experts, 2 x hidden, dim): gate rows, then up
        ours.experts.w1.copy_(gate)
        ours.experts.w3.copy_(up)
        ours.experts.w2.copy_(theirs.experts.down_proj)
    return theirs, ours


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_outputs_and_auxiliary_loss_equal_transformers(norm_topk_prob):
    theirs, ours = _pair(norm_topk_prob)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 37, DIM, generator=generator) for _ in range(3)]  # three "layers" of routing
    stats, logits = [], []
    for x in batches:
        with torch.no_grad():
            diff = (ours(x) - theirs(x)).abs().max().item()
        assert diff < 1e-5, diff
        stats.append(ours.last_stats)
        logits.append(theirs.gate(x.reshape(-1, DIM))[0])
    expected = load_balancing_loss_func(tuple(logits), EXPERTS, TOP_K)
    got = load_balancing_loss(stats, EXPERTS)
    print(f"\nMoE norm_topk_prob={norm_topk_prob}: aux loss ours {got.item():.8f}, transformers {expected.item():.8f}")
    assert abs(got.item() - expected.item()) < 1e-6


def test_grouped_matmul_equals_the_loop_in_values_and_gradients():
    _, grouped = _pair(True)
    _, loop = _pair(True)
    loop.experts.grouped = False
    x = torch.randn(3, 29, DIM, generator=torch.Generator().manual_seed(2))
    assert _grouped_mm_fits(x, grouped.experts.w1)  # the grouped kernel runs, not the loop
    results = []
    for model in (grouped, loop):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.square().sum().backward()
        results.append((out, xi.grad, *(p.grad for p in model.parameters())))
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-6 * max(1.0, b.abs().max().item())


def test_no_token_is_dropped_however_uneven_the_load():
    _, ours = _pair(False)
    with torch.no_grad():  # a router that sends almost every token to experts 0 and 1
        ours.router.weight.zero_()
        ours.router.weight[0, 0] = ours.router.weight[1, 0] = 50.0
    x = torch.randn(4, 16, DIM, generator=torch.Generator().manual_seed(3))
    x[..., 0] = x[..., 0].abs() + 1
    with torch.no_grad():
        out = ours(x)
    stats = ours.last_stats
    assert stats.counts[:2].tolist() == [64, 64] and int(stats.counts.sum()) == 64 * TOP_K
    # Every token got both experts' outputs: the loop over the same choices gives the same sum.
    weights, experts, _ = ours.route(x.reshape(-1, DIM))
    expected = torch.zeros(64, DIM)
    for t in range(64):
        for j in range(TOP_K):
            e = int(experts[t, j])
            xt = x.reshape(-1, DIM)[t : t + 1]
            h = torch.nn.functional.silu(xt @ ours.experts.w1[e].T) * (xt @ ours.experts.w3[e].T)
            expected[t] += weights[t, j] * (h @ ours.experts.w2[e].T)[0]
    assert (out.reshape(-1, DIM) - expected).abs().max() < 1e-5


def test_expert_parallel_regrouping_puts_every_row_with_its_expert():
    """parallel/ep.py: rows arrive grouped by source rank, then by the receiving rank's experts; the
    regrouping orders them by expert, then source, and its inverse restores arrival order. Simulated for
    3 source ranks and 4 local experts with uneven (and empty) chunks."""
    from parallel.ep import _by_expert

    received = torch.tensor([[2, 0, 1, 3], [0, 0, 2, 1], [1, 4, 0, 0]])  # received[source, expert]
    arrived = [(r, e) for r in range(3) for e in range(4) for _ in range(int(received[r, e]))]  # row labels in arrival order
    order = _by_expert(received)
    regrouped = [arrived[i] for i in order.tolist()]
    assert regrouped == sorted(arrived, key=lambda label: (label[1], label[0]))
    assert [regrouped[i] for i in torch.argsort(order).tolist()] == arrived  # the experts' outputs sent back
