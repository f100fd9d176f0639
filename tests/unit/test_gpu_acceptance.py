"""scripts/gpu_acceptance.sh cannot rot between GPU loans: its --dry mode prints the plan with each step's
budget and builds the table from made-up outputs of every step (the readers run); and the wheel folder it
carries to the GPU machine builds here, under the 64 MiB a call may carry."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_the_dry_run_prints_the_plan_and_the_table(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--dry", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    for step, seconds in (("gpu-tests", 260), ("1b-bf16", 240), ("1b-float8", 200), ("8b-qlora", 200), ("8b-bf16", 240),
                          ("30b-a3b-moe", 200), ("1b-8k-attention", 200), ("1b-32k-attention", 240), ("planner-memory", 200)):
        assert f"  {step:<10} {seconds:>4} s" in result.stdout, step
    assert "python -m pytest -q -s -p no:cacheprovider tests/gpu" in result.stdout
    record = json.loads((tmp_path / "acceptance.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["gpu-tests", "1b-bf16", "1b-float8", "8b-qlora", "8b-bf16",
                                                   "30b-a3b-moe", "1b-8k-attention", "1b-32k-attention", "planner-memory"]
    figures = {f["name"]: f for s in record["steps"] for f in s["figures"]}
    assert figures["test_cuda_paths::test_nccl"]["met"] is True
    assert figures["float8 tensorwise + compile / high precision + compile"]["target"] == ">= 1.3x"
    assert figures["document / causal"]["value"] == "1.00x"  # document attention against causal, made-up rows
    assert figures["AC full, batch 2 memory"]["met"] is True  # the planner's GPU memory rows, made up
    assert "| 8b-qlora | dry | 0 |" in (tmp_path / "acceptance.md").read_text()


def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run for real")
    result = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2 and result.stderr.strip() == "error: no CUDA GPU here; --dry shows the plan without one"


def test_the_wheel_folder_builds_under_64_mib(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHON": sys.executable, "WHL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = {p.name.split("-")[0] for p in tmp_path.glob("*.whl")}
    assert {"torchao", "omegaconf", "datasets", "dill", "multiprocess", "termcolor", "hqq"} <= wheels, wheels
    size = sum(p.stat().st_size for p in tmp_path.glob("*.whl"))
    print(f"\nGPU wheel folder: {size / 2**20:.1f} MiB in {len(wheels)} wheels")
    assert size < 64 * 2**20
