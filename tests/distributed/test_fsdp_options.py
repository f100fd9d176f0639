"""FSDP2 options on 2 real gloo ranks: CPU offload, reshard policy, bf16 compute, and determinism."""

from tests.helpers import run_train, tensorboard_scalars

COMMON = ["--config", "configs/debug.yaml", "training.steps=4", "metrics.log_every=1"]


def _losses(tmp_path, name, *overrides, nproc=2):
    result = run_train([*COMMON, f"job.output_dir={tmp_path / name}", *overrides], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return tensorboard_scalars(tmp_path / name, "loss/train")


def test_offload_and_reshard_never_keep_single_process_losses(tmp_path):
    reference = _losses(tmp_path, "one", nproc=1)
    offload = _losses(tmp_path, "offload", "parallel.cpu_offload=true", "parallel.fsdp_reshard_after_forward=never")
    assert max(abs(reference[s] - offload[s]) for s in reference) < 1e-5


def test_bf16_compute_tracks_fp32(tmp_path):
    fp32 = _losses(tmp_path, "fp32", nproc=1)
    bf16 = _losses(tmp_path, "bf16", "training.mixed_precision_param=bfloat16")
    # Same run up to bf16 rounding of the matmuls (about 3 significant digits).
    assert max(abs(fp32[s] - bf16[s]) for s in fp32) < 0.05
    assert bf16 != fp32  # and it really ran in bf16


def test_deterministic_runs_are_bitwise_equal(tmp_path):
    first = _losses(tmp_path, "a", "job.deterministic=true")
    second = _losses(tmp_path, "b", "job.deterministic=true")
    assert first == second
