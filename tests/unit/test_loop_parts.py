"""The loop's parts: LR schedule shape, FLOP counting, metrics output."""

import math

import pytest

from trainer.config.schema import LRSchedulerConfig, MetricsConfig
from models import build_meta_model, family_of
from tests.helpers import flavor_args
from trainer.plan import count_params
from trainer.metrics import MetricsLogger
from trainer.optimizer import lr_lambda


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay(decay):
    f = lr_lambda(LRSchedulerConfig(warmup_steps=10, decay_type=decay, min_lr_ratio=0.1), total_steps=110)
    factors = [f(i) for i in range(110)]  # factors[i] is used by step i + 1
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11]))  # rising through warmup
    assert factors[10] == pytest.approx(1.0 if decay == "constant" else 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi / 100)) if decay == "cosine" else 0.99))
    assert factors[-1] == pytest.approx(1.0 if decay == "constant" else 0.1)
    assert factors[59] == pytest.approx({"cosine": 0.55, "linear": 0.55, "constant": 1.0}[decay])


@pytest.mark.parametrize("flavor", ["llama3_1_8b", "llama3_2_1b"])
def test_flops_per_token_is_six_n_plus_attention(flavor):
    args = flavor_args(flavor)
    counts = count_params(build_meta_model(args))
    # The output projection is a matmul even when tied, so it counts once in N either way.
    n = counts["non_embedding"] + (args.vocab_size * args.dim if args.tie_embeddings else 0)
    assert family_of(args).flops_per_token(args, 2048) == 6 * n + 12 * args.n_layers * args.dim * 2048
    if flavor == "llama3_1_8b":
        assert counts["total"] == 8_030_261_248  # Meta's published count for Llama 3.1 8B


def _log(tmp_path, progress, steps=3):
    import torch

    logger = MetricsLogger(
        MetricsConfig(log_every=2, tensorboard=False, progress=progress), tmp_path, is_main=True,
        total_steps=steps, flops_per_token=100, peak_tflops=1e-6, device=torch.device("cpu"),
    )
    for step in range(1, steps + 1):
        logger.maybe_log(step, loss=2.0 / step, lr=1e-3, grad_norm=0.5, local_tokens=1000, step_time=0.5)
    logger.close()


def test_console_lines_and_progress(tmp_path, capsys):
    _log(tmp_path, "off")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].strip() for line in lines] == ["step      1", "step      2", "step      3"]
    assert "tok/s/device    2000.0" in lines[1] and "mfu 20.00%" in lines[1] and "step   500.0 ms" in lines[1]
    _log(tmp_path, "on")
    out = capsys.readouterr().out
    assert "\r[##########" in out and "3/3 loss 0.6667" in out


def test_a_resume_that_moves_the_schedule_says_so():
    """Raising training.steps on a finished run re-stretches the cosine: the start says by how much."""
    from trainer.config import load_config
    from trainer.optimizer import schedule_change

    before = load_config("configs/debug.yaml", ["training.steps=200"])
    assert schedule_change(before, load_config("configs/debug.yaml", ["training.steps=200"]), 200) is None
    note = schedule_change(before, load_config("configs/debug.yaml", ["training.steps=400"]), 200)
    # lr 3e-3, warmup 20, min_lr_ratio 0.1: the old schedule ended at 3.0e-4; the new one is not halfway down yet.
    assert note == ("note: the learning-rate schedule changed since the last start (training.steps 200 -> 400): step 201 "
                    "trains at lr 1.750e-03 where the earlier schedule gave 3.000e-04, and the schedule now ends at step 400")
