"""python -m bench at its smallest preset, both sides, so that it cannot rot. Timings are printed, never
asserted; what is checked is that both sides ran the same job (same weights, data and optimizer: the
same losses), that every table, the JSON and the plot are written, and that the profiled step of each side
holds the model's matmuls."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_bench_runs_ours_and_transformers_on_the_same_job(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--methods", "full", "--steps", "4",
                             "--warmup", "2", "--pairs", "1", "--no-memory-runs", "--profile", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    for line in ("| full | ours |", "| full | theirs |", "Ours against theirs", "| data | forward | backward | optimizer | other |",
                 "Top ops by self time in one profiled step, full", "| aten::mm | "):
        assert line in table, table
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    # Both sides' profiled step (ours: the trainer's metrics.profile_steps files) ran the model's matmuls.
    for side in ("ours", "theirs"):
        mm = next(op for op in results[f"full/{side}"]["ops"] if op["name"] == "aten::mm")
        assert mm["calls"] >= 3 * 2 * 7 and mm["self_ms"] > 0, (side, mm)  # 2 layers x 7 linears, forward and backward
    ours, theirs = results["full/ours"]["runs"][0]["steps"], results["full/theirs"]["runs"][0]["steps"]
    assert len(ours["loss"]) == len(theirs["loss"]) == 4
    # The same checkpoint, batches, AdamW and clipping: the same losses, step after step.
    assert max(abs(a - b) for a, b in zip(ours["loss"], theirs["loss"])) < 1e-3, (ours["loss"], theirs["loss"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_variant_rows_report_checkpoint_saves(tmp_path):
    """--variants: our rows with one setting changed each; the checkpoint group reads each save's report."""
    result = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--variants", "checkpoint", "--steps", "4",
                             "--warmup", "2", "--pairs", "1", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "bench.md").read_text().splitlines() if line.startswith(("| synchronous", "| asynchronous"))]
    assert len(rows) == 2, result.stdout
    for row in rows:
        size, blocked, written = (float(c) for c in row.strip("|").split("|")[-3:])
        assert size > 0 and 0 < blocked and 0 < written, row  # two saves per run (steps 2 and 4)
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [len(e["runs"][0]["saves"]) for e in results.values()] == [2, 2]


def test_bench_moe_runs_ours_and_both_transformers_experts_implementations(tmp_path):
    """A mixture of experts against transformers' Qwen3-MoE loop, once per experts implementation (eager and
    grouped_mm): the same losses step after step on all three (the load-balancing loss included in both
    sides' gradients), and a ratio row against each."""
    result = subprocess.run([sys.executable, "-m", "bench", "--preset", "moe-tiny", "--steps", "4", "--warmup", "2",
                             "--pairs", "1", "--no-memory-runs", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    for line in ("| full | theirs, eager experts |", "| full | theirs, grouped_mm experts |", "8 experts of hidden 64"):
        assert line in table, table
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    ours = results["full/ours"]["runs"][0]["steps"]["loss"]
    for side in ("theirs, eager experts", "theirs, grouped_mm experts"):
        theirs = results[f"full/{side}"]["runs"][0]["steps"]["loss"]
        assert len(theirs) == 4 and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3, (side, ours, theirs)
