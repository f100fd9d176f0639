"""python -m bench at its smallest preset, both sides, so that it cannot rot. Timings are printed, never
asserted; what is checked is that both sides ran the same job (same weights, data and optimizer: the
same losses) and that every table, the JSON and the plot are written."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_bench_runs_ours_and_transformers_on_the_same_job(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--methods", "full", "--steps", "4",
                             "--warmup", "2", "--pairs", "1", "--no-memory-runs", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    for line in ("| full | ours |", "| full | theirs |", "Ours against theirs", "| data | forward | backward | optimizer | other |"):
        assert line in table, table
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    ours, theirs = results["full/ours"]["runs"][0]["steps"], results["full/theirs"]["runs"][0]["steps"]
    assert len(ours["loss"]) == len(theirs["loss"]) == 4
    # The same checkpoint, batches, AdamW and clipping: the same losses, step after step.
    assert max(abs(a - b) for a, b in zip(ours["loss"], theirs["loss"])) < 1e-3, (ours["loss"], theirs["loss"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
