"""A run driven into NaN by an absurd learning rate: the bad steps are skipped and said so, the run stops
with exit code 3 after training.max_bad_steps of them, no checkpoint on disk holds a non-finite value
(the one saved just before the first bad step is discarded), and a restart resumes from the last good one."""

import math

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.helpers import run_train, tensorboard_scalars
from trainer.checkpoint.safe_reader import SafeFileSystemReader

ARGS = ["--config", "configs/debug.yaml", "metrics.log_every=1", "checkpoint.interval=2", "checkpoint.keep_last=0"]


def _all_finite(step_dir) -> bool:
    reader = SafeFileSystemReader(str(step_dir))
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_nan_steps_are_skipped_then_the_run_stops_and_resumes_from_the_last_good_checkpoint(tmp_path):
    good = run_train([*ARGS, "training.steps=4", f"job.output_dir={tmp_path}"])
    assert good.returncode == 0, good.stderr[-3000:]

    # The restored optimizer runs step 5 at its own rate; from there on the schedule is 1e30 times too high.
    bad = run_train([*ARGS, "training.steps=20", "optimizer.lr=1e30", f"job.output_dir={tmp_path}"])
    assert bad.returncode == 3, bad.stdout[-3000:] + bad.stderr[-3000:]
    skipped = [line for line in bad.stdout.splitlines() if "is not finite: skipped its optimizer update" in line]
    assert len(skipped) == 3 and "3 such step(s) in a row" in skipped[-1], bad.stdout[-3000:]
    first_bad = int(skipped[0].split(":")[0].removeprefix("step "))
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged" in errors[0] and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    root = tmp_path / "checkpoints"
    if (first_bad - 1) % 2 == 0:  # a checkpoint of the state that produced the first bad loss was discarded
        assert f"discarded step-{first_bad - 1}" in bad.stdout
    steps = sorted(int(p.name.split("-")[1]) for p in root.iterdir())
    assert steps and max(steps) < first_bad and not any(p.name.endswith(".partial") for p in root.iterdir())
    assert f"the last good checkpoint is {root / f'step-{max(steps)}'}" in errors[0]
    assert all(_all_finite(root / f"step-{s}") for s in steps)
    losses = tensorboard_scalars(tmp_path, "loss/train")
    grad_norms = tensorboard_scalars(tmp_path, "grad_norm")
    assert not all(math.isfinite(losses[s]) and math.isfinite(grad_norms[s]) for s in range(first_bad, first_bad + 3))

    resumed = run_train([*ARGS, "training.steps=10", f"job.output_dir={tmp_path}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / f'step-{max(steps)}'}" in resumed.stdout
    losses = tensorboard_scalars(tmp_path, "loss/train")
    assert all(math.isfinite(losses[s]) for s in range(max(steps) + 1, 11))
