"""SIGUSR1 / SIGTERM: every rank finishes its step, saves, exits 75 (torchrun: 1, plus the PREEMPTED
marker); the next start resumes and ends where an uninterrupted run ends."""

import signal

import pytest

from tests.helpers import kill_tree, run_train, start_train, tensorboard_scalars, wait_until

COMMON = ["--config", "configs/debug.yaml", "training.steps=12", "metrics.log_every=1", "checkpoint.interval=100"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert run_train([*COMMON, f"job.output_dir={out}"]).returncode == 0
    return tensorboard_scalars(out, "loss/train")


@pytest.mark.parametrize("sig,nproc,exit_code", [(signal.SIGUSR1, 1, 75), (signal.SIGTERM, 2, 1)])
def test_signal_saves_and_resume_continues(reference, tmp_path, sig, nproc, exit_code):
    args = [*COMMON, f"job.output_dir={tmp_path}"]
    proc = start_train(args, tmp_path / "first.log", nproc=nproc)
    wait_until(lambda: "step      4 |" in (tmp_path / "first.log").read_text(), what="step 4")
    if nproc == 1:
        proc.send_signal(sig)
    else:
        proc.send_signal(sig)  # to torchrun, as a scheduler would; it forwards it to the ranks
    assert proc.wait(timeout=120) == exit_code
    log = (tmp_path / "first.log").read_text()
    step = int((tmp_path / "PREEMPTED").read_text().split()[1])
    assert 4 <= step < 12 and f"preempted by {sig.name} after step {step}; a checkpoint was saved" in log
    assert (tmp_path / "checkpoints" / f"step-{step}").is_dir()

    resumed = run_train(args, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "PREEMPTED").exists()
    loss = tensorboard_scalars(tmp_path, "loss/train")
    assert sorted(loss) == list(range(1, 13))
    assert max(abs(loss[s] - reference[s]) for s in loss) < 1e-5
    kill_tree(proc.pid, signal.SIGKILL)  # nothing should be left, but never leak a rank


def test_signal_without_checkpointing_says_so(tmp_path):
    proc = start_train([*COMMON, "checkpoint.enabled=false", f"job.output_dir={tmp_path}"], tmp_path / "log")
    wait_until(lambda: "step      2 |" in (tmp_path / "log").read_text(), what="step 2")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75
    assert "no checkpoint was saved (checkpoint.enabled=false)" in (tmp_path / "log").read_text()
    assert not (tmp_path / "checkpoints").exists()
