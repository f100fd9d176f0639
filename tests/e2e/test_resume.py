"""Exact resume after kill -9, crash safety of async saves, and resharded resume, with real processes.

The resumed runs read a mixture of three sources of each kind (data.sources): Tiny Shakespeare's speeches
from the text file, TinyStories from prepared token shards, and C4 streamed, so a resume restores a plain
stream's, a memory-mapped one's and a streamed reader's positions and the mixture's counts at once. They keep
documents apart (data.attention=document, several documents to a window), so the saved data position carries
where the documents of a half-filled window begin. The killed run and its reference split every sequence over
2 context-parallel ranks (parallel.cp=2); their step-10 checkpoint resumes on 1 rank (cp1), 4 data-parallel
ranks, and dp2 x tp2."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import REPO, kill_tree, run_train, start_train, tensorboard_scalars, wait_until

STEPS = 20
BASE = ["--config", "configs/debug.yaml", f"training.steps={STEPS}", "metrics.log_every=1", "checkpoint.interval=10",
        "eval.every=5", "eval.steps=1"]  # validation on (the Shakespeare source's): it must not disturb a resume


CP2 = ["parallel.cp=2"]


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    """The runs' arguments: BASE over the mixture, its TinyStories shards prepared once for the module."""
    from tests.conftest import _shared
    from trainer.data.prepare import prepare

    shakespeare, stories, c4 = (_shared(p) for p in ("text/tinyshakespeare/input.txt",
                                                     "text/tinystories/tinystories_train_head.txt", "text/c4/c4_demo.jsonl"))
    prepared = tmp_path_factory.mktemp("shards") / "stories"
    prepare(None, [f"data.source={stories}", "data.text_sample_by=paragraph", "tokenizer.kind=byte"], prepared,
            num_proc=1, docs_per_shard=200, dtype=None)
    return [
        *BASE, "data.attention=document",
        f"data.sources=[{{source: '{shakespeare}', weight: 0.5, text_sample_by: paragraph, name: shakespeare, "
        f"eval_source: '{shakespeare}'}}, {{source: '{prepared}', weight: 0.3}}, "
        f"{{source: '{c4}', weight: 0.2, streaming: true, name: c4}}]",
    ]


def _samples(output_dir, world):
    """step -> sorted window ids trained on in that step, over all ranks (a resumed step's last record wins)."""
    by_step = {}
    for rank in range(world):
        per_rank = {}
        for line in (output_dir / "samples" / f"rank-{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            per_rank[record["step"]] = [tuple(w) for w in record["windows"]]
        for step, ids in per_rank.items():
            by_step.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in by_step.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, common):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_train([*common, *CP2, "job.deterministic=true", "metrics.log_samples=true", f"job.output_dir={out}"],
                       nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_kill_9_then_resume_is_bitwise_exact(uninterrupted, common, tmp_path):
    args = [*common, *CP2, "job.deterministic=true", "metrics.log_samples=true", f"job.output_dir={tmp_path}"]
    proc = start_train(args, tmp_path / "first.log", nproc=2)
    # Past the step-10 checkpoint, at whatever step the run has reached by then.
    wait_until(lambda: (tmp_path / "checkpoints" / "step-10").is_dir(), what="the step-10 checkpoint")
    wait_until(lambda: '"step": 12' in (tmp_path / "samples" / "rank-1.jsonl").read_text(), what="step 12")
    kill_tree(proc.pid, signal.SIGKILL)  # every rank and the launcher, without warning
    proc.wait()
    assert not (tmp_path / "checkpoints" / "step-20").exists()  # killed mid-run, not after it
    resumed = run_train(args, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step-10" in resumed.stdout

    want = tensorboard_scalars(uninterrupted, "loss/train")
    got = tensorboard_scalars(tmp_path, "loss/train")
    assert [got[s] for s in range(11, STEPS + 1)] == [want[s] for s in range(11, STEPS + 1)]  # bitwise
    want_eval, got_eval = tensorboard_scalars(uninterrupted, "eval/loss"), tensorboard_scalars(tmp_path, "eval/loss")
    assert sorted(want_eval) == [5, 10, 15, 20] and [got_eval[s] for s in (15, 20)] == [want_eval[s] for s in (15, 20)]
    # cp ranks read the same windows (each computes a slice of them): rank 0 logs them all.
    samples, reference = _samples(tmp_path, 1), _samples(uninterrupted, 1)
    assert samples == reference  # the same windows at every step
    every = [w for step in range(1, STEPS + 1) for w in samples[step]]
    assert len(every) == len(set(every)) == STEPS * 8  # none repeated, none skipped
    assert {source for source, _, _ in every} == {0, 1, 2}  # every kind of source was trained on and resumed
    # Each source's tokens, counted on every rank without a collective, continue across the resume: at the
    # end they are the windows the samples show, and the console's last line says so.
    tokens = {name: tensorboard_scalars(tmp_path, f"data/tokens/{name}")[STEPS] for name in ("shakespeare", "stories", "c4")}
    assert [tokens[n] for n in ("shakespeare", "stories", "c4")] == [256 * sum(s == k for s, _, _ in every) for k in range(3)]
    assert "data: trained 40.96K tokens of the mixture: shakespeare " in resumed.stdout
    assert tensorboard_scalars(tmp_path, "eval/loss_shakespeare") == got_eval  # the source's held-out set is eval/loss here


def test_a_hang_restarts_in_place_and_resumes_bitwise(uninterrupted, common, tmp_path):
    """Rank 1 hangs at step 13, past the step-10 checkpoint: the watchdog ends both ranks (exit 124), torchrun
    (`launch local --max-restarts 1`) starts them again in place, and the run resumes from step 10 to the end
    with the uninterrupted run's losses, bit for bit."""
    out = tmp_path / "run"
    args = [*common, *CP2, "job.deterministic=true", f"job.output_dir={out}", "fault.hang_timeout_s=5",
            "fault.inject=[hang:rank=1:step=13]"]
    env = {**os.environ, "TESSERA_DEBUG_FAULTS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--max-restarts", "1", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 13; ranks not in a collective (the others wait for them): 1 in injected_hang" in result.stderr
    assert "in injected_hang" in (out / "hangs" / "step-13" / "rank-1.txt").read_text()
    assert ("restart: in-job restart 1 of at most 1; resumed from step 10; the last run reached step 12, so steps "
            "11-12 are trained again (2 lost)") in result.stdout
    restarts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"restart"' in line]
    assert [(r["step"], r["restart"], r["steps_lost"]) for r in restarts] == [(10, 1, 2)]
    assert not (out / "HUNG").exists()  # the restarted start cleared it, and finished
    want, got = tensorboard_scalars(uninterrupted, "loss/train"), tensorboard_scalars(out, "loss/train")
    assert got == want  # every step, bitwise


@pytest.mark.parametrize("world,extra", [(1, []), (4, ["training.local_batch_size=2"]), (4, ["parallel.tp=2"])])
def test_resharded_resume(uninterrupted, common, tmp_path, world, extra):
    step10 = uninterrupted / "checkpoints" / "step-10"
    args = [*common, f"job.output_dir={tmp_path}", f"checkpoint.resume_from={step10}", *extra]
    result = run_train(args, nproc=world)
    assert result.returncode == 0, result.stderr[-3000:]
    want = tensorboard_scalars(uninterrupted, "loss/train")
    got = tensorboard_scalars(tmp_path, "loss/train")
    assert sorted(got) == list(range(11, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) < 1e-5


def test_kill_9_during_async_save_resumes_from_the_previous_one(tmp_path):
    # A model big enough (25M parameters, 300 MB of checkpoint) that a save takes a while to write.
    big = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "training.seq_len=64"]
    args = ["--config", "configs/debug.yaml", "training.steps=40", "checkpoint.interval=2", "checkpoint.async_save=true",
            "checkpoint.keep_last=0", "metrics.log_every=1", f"job.output_dir={tmp_path}", *big]
    proc = start_train(args, tmp_path / "first.log", nproc=2)
    root = tmp_path / "checkpoints"
    wait_until(lambda: (root / "step-2").is_dir(), what="a first complete checkpoint")
    wait_until(lambda: any(p.name.endswith(".partial") for p in root.iterdir()), what="an async save in flight")
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = [p.name for p in root.iterdir() if p.name.endswith(".partial")]
    complete = sorted(int(p.name.split("-")[1]) for p in root.iterdir() if not p.name.endswith(".partial"))
    assert partial, "the kill should have caught a save half-written"

    resumed = run_train([*args, "training.steps=" + str(complete[-1] + 2)], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"removed the incomplete {partial[0]}" in resumed.stdout
    assert f"resumed from {root / f'step-{complete[-1]}'}" in resumed.stdout
    assert not any(p.name.endswith(".partial") for p in root.iterdir())
