"""Replica groups through torchft, on CPU over gloo: `python -m launch local --replica-groups 2` starts a
Lighthouse and two one-process groups. Group 1 is killed (SIGKILL) at step 6; group 0 keeps stepping alone
(its fault/replica_groups_stepping reads 1); torchrun restarts group 1, which resumes from its step-4
checkpoint, takes group 0's current state and steps with it to the end: both export the same weights, and
the final loss stays near an uninterrupted run's (the steps group 1 missed trained on half the data). The
uninterrupted run is one process with both groups' batch (each group reads its share of the same data order,
so two groups that never fail train what one process does, up to float rounding)."""

import importlib.util
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO, run_train, tensorboard_scalars

if importlib.util.find_spec("torchft") is None and os.environ.get("CI") != "true":
    pytest.skip("torchft is not installed (pip install torchft, the `dev` extra has it)", allow_module_level=True)

STEPS = 40
ARGS = ["--config", "configs/debug.yaml", f"training.steps={STEPS}", "metrics.log_every=1", "checkpoint.interval=4",
        "export.hf=true", "export.dtype=float32", "job.deterministic=true", "fault.replica_timeout_s=30", "metrics.progress=off"]


def _launch(out, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "TESSERA_DEBUG_FAULTS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "launch", "local", "--replica-groups", "2", "--nproc", "1",
                           "--max-restarts", "1", *ARGS, f"job.output_dir={out}", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_a_group_dies_the_other_steps_on_and_it_rejoins_with_the_live_state(tmp_path):
    # One process with the two groups' batch together: each group steps on the debug config's 8 sequences.
    reference = run_train([*ARGS, "export.hf=false", "training.global_batch_size=16", f"job.output_dir={tmp_path / 'ref'}"],
                          env={"OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = _launch(tmp_path / "run", "fault.inject=[crash:rank=0:step=6:replica=1]")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    stepping = tensorboard_scalars(tmp_path / "run" / "replica-0", "fault/replica_groups_stepping")
    alone = [s for s, n in stepping.items() if n == 1.0]
    print(f"\nREPLICAS group 0 stepped alone for {len(alone)} steps ({min(alone)}-{max(alone)}) while group 1 restarted")
    assert len(alone) >= 3 and stepping[STEPS] == 2.0, stepping
    assert "[replica 1][default0]:replicas: group 1 was behind; it took a live peer's state at step" in run.stdout

    weights = [load_file(tmp_path / "run" / f"replica-{i}" / "export" / "hf" / "model.safetensors") for i in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])  # the same model, bit for bit

    want = tensorboard_scalars(tmp_path / "ref", "loss/train")
    got = [tensorboard_scalars(tmp_path / "run" / f"replica-{i}", "loss/train") for i in (0, 1)]
    tail = range(STEPS - 9, STEPS + 1)  # the last 10 steps' mean: one step's loss swings with its batch
    want_mean, got_mean = sum(want[s] for s in tail) / 10, sum(g[s] for g in got for s in tail) / 20
    print(f"REPLICAS mean loss of the last 10 steps: {got_mean:.4f} against {want_mean:.4f} uninterrupted")
    # How far the run lags depends on how long group 1 took to restart, which a loaded machine stretches:
    # 8 steps alone (6-13) left it 9% behind at step 40 on the CI machine, where the loss still falls fast.
    # The two groups' equal weights above are the exact check; this one catches a broken state (a fresh
    # model's loss is about twice this).
    assert abs(got_mean - want_mean) / want_mean < 0.15
