"""SIGUSR1 / SIGTERM / Ctrl-C: every rank finishes its step, saves, exits 75 (torchrun: 1, plus the
PREEMPTED marker; `launch local`: 75); the next start resumes and ends where an uninterrupted run ends.
A second Ctrl-C stops at once (130). No traceback anywhere."""

import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, kill_tree, run_train, start_train, tensorboard_scalars, wait_until

COMMON = ["--config", "configs/debug.yaml", "training.steps=12", "metrics.log_every=1", "checkpoint.interval=100"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert run_train([*COMMON, f"job.output_dir={out}"]).returncode == 0
    return tensorboard_scalars(out, "loss/train")


@pytest.mark.parametrize("sig,nproc,exit_code", [(signal.SIGUSR1, 1, 75), (signal.SIGTERM, 2, 1), (signal.SIGINT, 1, 75)])
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
    how = "interrupted by SIGINT (Ctrl-C)" if sig == signal.SIGINT else f"preempted by {sig.name}"
    assert 4 <= step < 12 and f"{how} after step {step}; a checkpoint was saved" in log
    if nproc == 1:
        assert "Traceback" not in log
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


def test_ctrl_c_to_launch_local_saves_on_every_rank_and_resumes(reference, tmp_path):
    """A terminal's Ctrl-C reaches the launcher's process group: the launcher hands it to torchrun, every
    rank saves after its step, the launcher exits 75 with no traceback (torchrun's own lines kept back)."""
    out = tmp_path / "run"
    args = [*COMMON[2:], f"job.output_dir={out}"]  # COMMON without --config configs/debug.yaml
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "launch", "local", "--nproc", "2", "--config", "configs/debug.yaml",
                                 *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_until(lambda: "step      4 |" in (tmp_path / "launch.log").read_text(), what="step 4")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the foreground process group
    assert proc.wait(timeout=180) == 75
    text = (tmp_path / "launch.log").read_text()
    step = int((out / "PREEMPTED").read_text().split()[1])
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    assert f"after step {step}; a checkpoint was saved" in text and (out / "checkpoints" / f"step-{step}").is_dir()
    resumed = run_train(["--config", "configs/debug.yaml", *args], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    loss = tensorboard_scalars(out, "loss/train")
    assert sorted(loss) == list(range(1, 13)) and max(abs(loss[s] - reference[s]) for s in loss) < 1e-5


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The second Ctrl-C lands inside a step (16 microbatches: about a second, so a slow machine cannot
    finish the step and its save first) and the process exits from the handler: 130, no traceback, the
    interrupted step not saved."""
    slow = ["training.global_batch_size=64", "training.local_batch_size=4"]
    proc = start_train([*COMMON, *slow, "training.steps=400", f"job.output_dir={tmp_path}"], tmp_path / "log")
    wait_until(lambda: "step      2 |" in (tmp_path / "log").read_text(), what="step 2")
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "interrupted: the step finishes" in (tmp_path / "log").read_text(), what="the first Ctrl-C")
    proc.send_signal(signal.SIGINT)  # two signals of one kind sent at once may arrive as one
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "stopped at once by Ctrl-C" in log, log[-2000:]
    # No step was saved. Where the first Ctrl-C landed between two steps, its save began and the second one
    # stopped it: a step-N.partial is left, which is no checkpoint (the next start removes it).
    assert not [p for p in tmp_path.glob("checkpoints/step-*") if not p.name.endswith(".partial")]
