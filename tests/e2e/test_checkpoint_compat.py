"""Checkpoints across versions: a checkpoint written by an earlier Tessera (tests/fixtures/checkpoint-format-1,
kept as files, never regenerated: its README says why) resumes with this code and trains on to the losses
that run had; a checkpoint of a format newer than this code reads is refused in one line."""

import json
import shutil

from tests.helpers import REPO, run_train, tensorboard_scalars

import train

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint-format-1"
ARGS = ["--config", "configs/debug.yaml", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden_dim=64", "training.steps=4", "training.seq_len=64", "training.local_batch_size=2",
        "training.global_batch_size=2", "data.text_sample_by=paragraph", "checkpoint.interval=2", "checkpoint.keep_last=0", "metrics.log_every=1",
        "job.deterministic=true", "lr_scheduler.warmup_steps=2"]


def _run(tmp_path, shared) -> list[str]:
    """The fixture's run's arguments, its step-2 checkpoint copied into a fresh output directory."""
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "step-2", out / "checkpoints" / "step-2")
    return [*ARGS, f"data.source={shared('text/tinyshakespeare/input.txt')}", f"job.output_dir={out}"]


def test_a_format_1_checkpoint_resumes_to_its_runs_losses(tmp_path, shared):
    args = _run(tmp_path, shared)
    out = tmp_path / "run"
    result = run_train(args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint: resumed from" in result.stdout and "step-2" in result.stdout
    want = {int(step): loss for step, loss in json.loads((FIXTURE / "losses.json").read_text()).items()}
    got = tensorboard_scalars(out, "loss/train")
    # Bitwise on the torch that wrote it; a later torch may round a kernel differently, never by this much
    # (a resume that lost the optimizer's moments or the data position is off by more than 1e-2).
    assert sorted(got) == [3, 4] and all(abs(got[s] - want[s]) < 1e-4 for s in want), (got, want)


def test_a_newer_format_is_refused_in_one_line(tmp_path, shared, capsys, monkeypatch):
    args = _run(tmp_path, shared)
    manifest = tmp_path / "run" / "checkpoints" / "step-2" / "manifest.json"
    written = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**written, "checkpoint_format": 2}))
    monkeypatch.chdir(REPO)
    assert train.main([*args, "--check"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is checkpoint format 2, written by a newer Tessera than this one (which reads formats up to 1)" in error[0]
