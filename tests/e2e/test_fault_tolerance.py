"""Hangs and slow ranks on 2 real gloo ranks under `python -m launch local`, made on purpose with
fault.inject (TESSERA_DEBUG_FAULTS=1): the straggler warning names the slow rank and every rank's times
reach TensorBoard; the watchdog ends a hung run within fault.hang_timeout_s and a few seconds, each rank's
stack file naming where it was, with exit code 124. The in-job restart after a hang, bitwise against an
uninterrupted run, is in test_resume.py (it shares that file's reference run); on Slurm in tests/slurm."""

import os
import re
import subprocess
import sys
import time

from tests.helpers import REPO, tensorboard_scalars
from trainer.fault import EXIT_HUNG

TIMEOUT_S = 4
ARGS = ["--config", "configs/debug.yaml", "training.steps=10", "metrics.log_every=1", "checkpoint.enabled=false",
        "fault.straggler_steps=3", f"fault.hang_timeout_s={TIMEOUT_S}",
        "fault.inject=[slow:rank=1:factor=4,hang:rank=0:step=7]"]


def test_a_slow_rank_is_named_and_a_hang_ends_the_run_with_every_ranks_stack(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TESSERA_DEBUG_FAULTS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch", "local", "--nproc", "2", *ARGS, f"job.output_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, last_step_at = [], None
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"\[default0\]:step +6 \|", line):
            last_step_at = time.monotonic()
    proc.wait(timeout=60)
    took = time.monotonic() - last_step_at
    text = "".join(lines)
    print(f"\nFAULT a hang on rank 0 ended the run {took:.1f} s after the last step (fault.hang_timeout_s={TIMEOUT_S})")
    assert proc.returncode == EXIT_HUNG, text[-3000:]
    assert took < TIMEOUT_S + 10, text[-3000:]

    # The straggler: named once its compute stayed over 1.3x the median for 3 steps; every rank's times read back.
    assert re.search(r"straggler: rank 1 computed [\d.]+ s in step \d, [\d.]+x the ranks' median .* for 3 steps in a row", text), text
    assert "straggler: rank 0" not in text
    fast, slow = (tensorboard_scalars(out, f"ranks/compute_seconds/rank_{r}") for r in (0, 1))
    assert sorted(fast) == list(range(1, 7)) and all(slow[s] > 2.5 * fast[s] for s in range(2, 7)), (fast, slow)
    walls = [tensorboard_scalars(out, f"ranks/step_seconds/rank_{r}")[5] for r in (0, 1)]
    assert abs(walls[0] - walls[1]) < 0.5 * max(walls)  # the wall clock cannot tell them apart: each waits for the other

    # The hang: one line naming the step, the rank the other waited for and where; the stacks; the marker.
    hang = [line for line in lines if "hang: no step completed" in line]
    assert len(hang) == 1, text[-3000:]
    assert re.search(r"at step 7; ranks not in a collective \(the others wait for them\): 0 in injected_hang "
                     r"\(trainer/fault/inject.py:\d+\); waiting in a collective: 1; stacks under .*hangs/step-7; "
                     rf"exiting with code {EXIT_HUNG}", hang[0]), hang[0]
    stacks = {r: (out / "hangs" / "step-7" / f"rank-{r}.txt").read_text() for r in (0, 1)}
    assert "not in a collective, in injected_hang" in stacks[0] and "in injected_hang" in stacks[0]
    assert "waiting in a collective" in stacks[1] and "torch/distributed" in stacks[1] and "train_step" in stacks[1]
    assert (out / "HUNG").read_text() == "step 7\n"
    assert f"exited with code {EXIT_HUNG} (a hang: the watchdog's stack files are under {out / 'hangs'})" in text
