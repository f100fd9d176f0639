"""`python -m launch local`: train.py under torchrun on this machine, each rank's output in a file under
the run's output directory, the cores shared out, and the config checked once for the process count."""

import os
import subprocess
import sys

from tests.helpers import REPO


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "launch", "local", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_local_launcher_on_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    result = _launch("--nproc", "2", "--config", "configs/debug.yaml", "training.steps=3", "metrics.log_every=1",
                     "checkpoint.enabled=false", f"job.output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"launch: 2 process(es), OMP_NUM_THREADS={threads}, rank logs under {out / 'logs' / 'start-1'}" in result.stdout
    assert "check: ok" in result.stdout
    logs = sorted((out / "logs" / "start-1").rglob("stdout.log"))
    assert len(logs) == 2, logs
    by_rank = {log.parent.name: log.read_text() for log in logs}
    assert "step      3 |" in by_rank["0"] and "step" not in by_rank["1"]  # only rank 0 reports

    # A process count the config's layout cannot use: the check's one line, and no rank started.
    bad = _launch("--nproc", "3", "--config", "configs/debug.yaml", f"job.output_dir={out}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: training.global_batch_size=8 is not a multiple")
    assert not (out / "logs" / "start-2").exists()
    zero = _launch("--nproc", "0", "--config", "configs/debug.yaml", f"job.output_dir={out}")
    assert zero.returncode == 2 and zero.stderr.strip() == "error: argument --nproc: 0 must be at least 1 (see python -m launch local --help)"
