"""FSDP2 over 2 real gloo ranks (torchrun) against a single fp32 process: the oracle for data parallelism."""

from tests.helpers import run_train, tensorboard_scalars


def test_two_ranks_match_one_process(tmp_path):
    common = ["--config", "configs/debug.yaml", "training.steps=10", "metrics.log_every=1"]
    single = run_train([*common, f"job.output_dir={tmp_path / 'one'}"], nproc=1)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_train([*common, f"job.output_dir={tmp_path / 'two'}"], nproc=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "2 cpu rank(s) (pp 1 x dp_replicate 1 x dp_shard 2 x tp 1), 1 microbatch(es)" in sharded.stdout
    assert "1 cpu rank(s) (pp 1 x dp_replicate 1 x dp_shard 1 x tp 1), 2 microbatch(es)" in single.stdout

    one = tensorboard_scalars(tmp_path / "one", "loss/train")
    two = tensorboard_scalars(tmp_path / "two", "loss/train")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    assert one[10] < one[1] - 1.0  # it trains
    worst = max(abs(one[s] - two[s]) for s in one)
    assert worst < 1e-5, (worst, one, two)
    norms_one = tensorboard_scalars(tmp_path / "one", "grad_norm")
    norms_two = tensorboard_scalars(tmp_path / "two", "grad_norm")
    assert max(abs(norms_one[s] - norms_two[s]) / norms_one[s] for s in one) < 1e-4
