"""launch/slurm.sbatch on a REAL Slurm: slurmctld, two slurmd daemons posing as nodes n1 and n2, and
munge, on this one machine (scripts/slurm_cluster.sh; .ci/run starts it before the suite and stops it
after). Where Slurm cannot run (not root, no package manager) these tests skip saying why, except under
CI=true, where a missing Slurm fails them.

Every job trains the debug model on 2 nodes x 2 gloo processes (4 ranks)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, run_train, tensorboard_scalars, wait_until

CLUSTER = REPO / "scripts" / "slurm_cluster.sh"
STEPS = 12
RUN = ["configs/debug.yaml", f"training.steps={STEPS}", "metrics.log_every=1", "job.deterministic=true",
       "training.local_batch_size=2", "checkpoint.interval=100"]
ENV = {**os.environ, "TESSERA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TESSERA_NPROC_PER_NODE": "2",
       "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def slurm():
    if subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True).returncode != 0:
        why = subprocess.run(["bash", str(CLUSTER), "why-not"], capture_output=True, text=True).stdout.strip()
        if why and os.environ.get("CI") != "true":
            pytest.skip(f"no Slurm here: {why}")
        started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, f"a real Slurm is required under CI=true: {started.stderr}"


def submit(tmp_path: Path, args: list[str], env: dict | None = None) -> tuple[str, Path]:
    log = tmp_path / "job.log"
    result = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={log}", "launch/slurm.sbatch", *args],
                            cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], log


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _nodes_idle() -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return bool(states) and all(state == "idle" for state in states)


def wait_job(job: str, timeout: float = 300) -> dict[str, str]:
    """Until the job has ended for good; a requeued job (held ~2 minutes by Slurm's BeginTime) is started at
    once. A job that requeues itself passes through an ended state for a moment: the end must hold for 3 s."""
    deadline, ended_since, held_since = time.monotonic() + timeout, None, None
    while time.monotonic() < deadline:
        fields = job_fields(job)
        state = fields.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            ended_since = ended_since or time.monotonic()
            if time.monotonic() - ended_since > 3:
                return fields
        else:
            ended_since = None
        held = state == "PENDING" and fields.get("Reason") == "BeginTime"
        held_since = (held_since or time.monotonic()) if held else None
        if held and time.monotonic() - held_since > 2 and _nodes_idle():
            # Not at once: slurmd refuses a credential issued in the same second as the requeue revoked the
            # last one ("Job credential revoked", the job then fails), which Slurm's own delay avoids.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        time.sleep(0.25)
    subprocess.run(["scancel", job])
    raise TimeoutError(f"job {job} did not end in {timeout} s: {job_fields(job)}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run as a plain 4-process torchrun job."""
    out = tmp_path_factory.mktemp("torchrun")
    result = run_train(["--config", *RUN, f"job.output_dir={out}"], nproc=4)
    assert result.returncode == 0, result.stderr[-3000:]
    return tensorboard_scalars(out, "loss/train")


def test_preemption_saves_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job, log = submit(tmp_path, [*RUN, f"job.output_dir={out}"])
    wait_until(lambda: log.is_file() and re.search(r"^step +5 ", log.read_text(), re.M), timeout=120, what="step 5")
    # What Slurm's --signal=B:USR1@N does before the time limit: the batch shell gets the warning.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    fields = wait_job(job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-3000:]
    assert "got SIGUSR1: asking the ranks to save and stop" in text
    assert re.search(r"preempted after step \d+: checkpoint saved; requeued \(restart 1 of at most 20\)", text)
    assert "checkpoint: resumed from" in text and "job " + job + " start 2" in text
    assert tensorboard_scalars(out, "loss/train") == reference  # bitwise across the requeue


# Faults made on purpose (trainer/fault/inject.py); the cluster has no accounting (sacct), so scontrol's
# Restarts (Slurm's requeues of the job) and the job log's "start N" lines say whether a new allocation began.
FAULTS = {"TESSERA_DEBUG_FAULTS": "1"}


def test_two_nodes_train_as_plain_torchrun_does_through_a_hang_and_an_in_place_restart(slurm, reference, tmp_path):
    """Rank 3 (on the second node) hangs at step 6: the watchdog ends every rank, torchrun restarts them in
    place within the same allocation, the run resumes from step 4 and its losses equal the plain 4-process
    torchrun job's, bit for bit."""
    out = tmp_path / "run"
    job, log = submit(tmp_path, [*RUN, "checkpoint.interval=4", "fault.hang_timeout_s=6", "fault.inject=[hang:rank=3:step=6]",
                                 f"job.output_dir={out}"], env={**FAULTS, "TESSERA_MAX_RESTARTS": "1"})
    fields = wait_job(job)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", text[-3000:]
    assert "2 node(s) x 2 process(es) = 4 ranks" in text and "finished" in text
    assert f"job {job} start 1" in text and f"job {job} start 2" not in text  # one allocation, never requeued
    assert "at step 6; ranks not in a collective (the others wait for them): 3 in injected_hang" in text
    assert "restart: in-job restart 1 of at most 1; resumed from step 4; the last run reached step 5" in text
    assert tensorboard_scalars(out, "loss/train") == reference  # bitwise across the in-place restart


def test_a_lost_rank_ends_the_start_and_is_requeued_at_most_the_limit(slurm, tmp_path):
    """Rank 3 is killed (SIGKILL) at step 3 of every start: a lost rank, no error of the run's own, so the job
    is requeued once (TESSERA_FAILURE_RETRIES=1) and then ends FAILED; each start ends within the dead-rank
    timeout rather than the collectives' own."""
    out = tmp_path / "run"
    job, log = submit(tmp_path, [*RUN, "training.steps=500", "fault.inject=[crash:rank=3:step=3]", f"job.output_dir={out}"],
                      env={**FAULTS, "TESSERA_DEAD_RANK_TIMEOUT": "15", "TESSERA_FAILURE_RETRIES": "1"})
    wait_until(lambda: log.is_file() and re.search(r"^step +2 ", log.read_text(), re.M), timeout=120, what="step 2")
    killed = time.monotonic()
    wait_until(lambda: "transient, requeued" in log.read_text(), timeout=120, what="the requeue")
    took = time.monotonic() - killed
    fields = wait_job(job, timeout=300)
    text = log.read_text()
    print(f"\nSLURM a lost rank ended the start in {took:.1f} s")
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "1", text[-3000:]
    assert ("after 0 in-job restart(s), a lost rank or node (no error of the run's own): transient, requeued "
            "(failure 1 of at most TESSERA_FAILURE_RETRIES=1)") in text
    assert ("a lost rank or node (no error of the run's own): not requeued (TESSERA_FAILURE_RETRIES=1 used up)"
            in text.split(f"job {job} start 2")[1])
    assert took < 60


BAD = {
    "config missing": (["configs/nope.yaml"], "config file not found: configs/nope.yaml"),
    "override that does not parse": (["configs/debug.yaml", "training.steps=many"],
                                     "config key 'training.steps': Value 'many' of type 'str' could not be converted"),
    "unknown key": (["configs/debug.yaml", "training.stpes=5"], "training.stpes"),
    "layout that 4 ranks cannot make": (["configs/debug.yaml", "parallel.tp=3"],
                                        "pp x dp_replicate x tp = 1 x 1 x 3 = 3 do not divide the world size 4"),
    "a layout for fewer processes": (["configs/debug.yaml", "parallel.dp_shard=2"],
                                     "= 2 do not multiply to the world size 4; set parallel.dp_shard=-1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_submission_fails_in_seconds_with_the_trainers_message(slurm, tmp_path, case):
    args, expected = BAD[case]
    start = time.monotonic()
    # Requeues for transient failures are allowed: a config error is still never requeued.
    job, log = submit(tmp_path, [*args, f"job.output_dir={tmp_path / 'run'}"], env={"TESSERA_FAILURE_RETRIES": "2"})
    fields = wait_job(job, timeout=120)
    took = time.monotonic() - start
    text = log.read_text()
    print(f"\nSLURM bad submission ({case}): ended in {took:.1f} s")
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], text
    assert "stopped before launching: train.py --check failed" in text and "torch.distributed.run" not in text
    assert took < 30
