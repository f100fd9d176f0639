"""Qwen3 through the same trainer and layouts as Llama: FSDP, TP (with its per-head norms) and pipeline
stages each match one fp32 process within 1e-5, and QLoRA over an NF4 Qwen3 base trains on 2 ranks."""

import pytest

from tests.helpers import run_train, tensorboard_scalars

STEPS = 4
COMMON = ["--config", "configs/debug.yaml", "model.flavor=qwen3_debug", f"training.steps={STEPS}", "metrics.log_every=1",
          "checkpoint.enabled=false"]
LAYOUTS = {"dp_shard=2": [], "tp=2": ["parallel.tp=2"], "pp=2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3_single")
    result = run_train([*COMMON, f"job.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return tensorboard_scalars(out, "loss/train")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, tmp_path, layout):
    result = run_train([*COMMON, f"job.output_dir={tmp_path}", *LAYOUTS[layout]], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    loss = tensorboard_scalars(tmp_path, "loss/train")
    worst = max(abs(loss[s] - reference[s]) for s in range(1, STEPS + 1))
    print(f"\nQWEN3 PARITY {layout}: max |loss - single| = {worst:.2e}")
    assert worst < 1e-5
    assert reference[STEPS] < reference[1] - 1.0


def test_qlora_over_an_nf4_qwen3_base_trains_on_two_ranks(tmp_path):
    args = ["--config", "configs/debug.yaml", "model.flavor=qwen3_debug", "training.steps=12", "metrics.log_every=1",
            "adapters.kind=lora", "adapters.quantize_base=nf4", "optimizer.lr=1e-2", "checkpoint.enabled=false",
            f"job.output_dir={tmp_path}"]
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(over a 4-bit nf4 base)" in result.stdout
    loss = tensorboard_scalars(tmp_path, "loss/train")
    print(f"\nQWEN3 QLoRA nf4 on 2 ranks: loss {loss[1]:.4f} -> {loss[12]:.4f}")
    assert loss[12] < loss[1] - 0.5
