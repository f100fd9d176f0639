"""The distillation loss against torch.nn.functional's own KL divergence and cross-entropy: its KL in both
directions, its temperature, its masking and its chunking (which must change nothing but memory)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.schema import DistillConfig
from trainer.distill import DistillLoss, kd_divergence
from trainer.loss import IGNORE_INDEX

VOCAB = 50


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_divergence_equals_kl_div(direction):
    torch.manual_seed(0)
    student, teacher = torch.randn(37, VOCAB), 3 * torch.randn(37, VOCAB)
    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    # kl_div(input, target) is KL(target || input).
    expected = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) if direction == "forward" else \
        F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    got = kd_divergence(student, teacher, direction)
    assert (got - expected).abs().max() < 1e-6
    assert (got >= -1e-6).all()


def _loss(chunk_tokens: int, direction: str):
    torch.manual_seed(1)
    teacher = nn.Embedding(VOCAB, VOCAB)  # inputs -> logits: any module that maps tokens to logits will do
    inputs = torch.randint(0, VOCAB, (3, 11))
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[0, :4] = IGNORE_INDEX  # a prompt, as SFT masks it
    logits = torch.randn(3, 11, VOCAB, requires_grad=True)
    cfg = DistillConfig(teacher="unused", kd_ratio=0.3, temperature=2.0, loss=direction, chunk_tokens=chunk_tokens)
    loss_fn = DistillLoss(cfg, teacher)
    loss_fn.start(scale=0.25, device=torch.device("cpu"))
    loss = loss_fn(logits, labels, inputs=inputs)
    loss.backward()
    return loss, logits.grad, loss_fn, (logits, labels, teacher(inputs).detach())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_chunked_loss_equals_the_direct_computation(direction):
    whole, whole_grad, _, _ = _loss(10_000, direction)
    loss, grad, loss_fn, (logits, labels, teacher_logits) = _loss(5, direction)  # 29 label tokens in 6 chunks
    kept = labels.flatten() != IGNORE_INDEX
    s, t = logits.detach().flatten(0, 1)[kept] / 2.0, teacher_logits.flatten(0, 1)[kept] / 2.0
    pair = (F.log_softmax(s, -1), F.log_softmax(t, -1))
    kl = F.kl_div(*(pair if direction == "forward" else pair[::-1]), log_target=True, reduction="sum") * 4.0
    ce = F.cross_entropy(logits.detach().flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    expected = (0.7 * ce + 0.3 * kl) * 0.25
    assert abs(loss.item() - expected.item()) < 1e-6 * abs(expected.item())
    assert abs(loss.item() - whole.item()) < 1e-6 * abs(expected.item())
    assert (grad - whole_grad).abs().max() < 1e-6
    assert grad.flatten(0, 1)[~kept].abs().max() == 0  # masked tokens teach nothing
    parts = loss_fn.parts()
    assert abs(parts["ce"].item() - ce.item()) < 1e-4 and abs(parts["kl"].item() - kl.item()) < 1e-4
    loss_fn.record(loss)
    assert abs(loss_fn.summed.item() - expected.item() / 0.25) < 1e-4


def test_validation_measures_cross_entropy_only():
    """plain(): the student's own summed cross-entropy (the teacher is not run: it would fail here)."""
    loss_fn = DistillLoss(DistillConfig(teacher="unused", kd_ratio=0.9), teacher=None)
    plain = loss_fn.plain()
    torch.manual_seed(2)
    logits, labels = torch.randn(2, 5, VOCAB), torch.randint(0, VOCAB, (2, 5))
    labels[0, :2] = IGNORE_INDEX
    plain.start(scale=1.0, device=torch.device("cpu"))
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)
    assert abs(plain(logits, labels).item() - expected.item()) < 1e-6 and plain.plain() is plain


def test_the_teacher_sees_the_students_document_masks():
    """With document attention the teacher runs on the same packed windows with the same document ids:
    the KL against a teacher whose documents are kept apart, not one that reads across them."""
    from tests.helpers import build_adapted, flavor_args
    from trainer.config.schema import AdaptersConfig

    teacher = build_adapted(flavor_args("debug", vocab_size=VOCAB, max_seq_len=64), AdaptersConfig(), init_from=None,
                            seed=3).eval()
    inputs, labels = torch.randint(0, VOCAB, (2, 24)), torch.randint(0, VOCAB, (2, 24))
    documents = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 21])
    logits = torch.randn(2, 24, VOCAB)
    cfg = DistillConfig(teacher="unused", kd_ratio=1.0, temperature=1.0)
    kl = {}
    for name, docs in (("document", documents), ("causal", None)):
        loss_fn = DistillLoss(cfg, teacher)
        loss_fn.start(scale=1.0, device=torch.device("cpu"))
        kl[name] = loss_fn(logits, labels, inputs=inputs, documents=docs).item()
    with torch.no_grad():
        expected = kd_divergence(logits.flatten(0, 1), teacher(inputs, documents=documents).flatten(0, 1), "forward").sum()
    assert abs(kl["document"] - expected.item()) < 1e-4 * expected.item()
    assert abs(kl["document"] - kl["causal"]) > 1e-3
