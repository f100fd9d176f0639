"""metrics.profile_steps: the profiled step's Chrome trace, op table and op records are written, and
only for the steps asked for. (The bench test reads the records of a real training run.)"""

import json

import torch

from trainer.profiling import StepProfiler


def test_profiled_steps_write_a_trace_and_the_top_ops(tmp_path):
    profiler = StepProfiler([2], tmp_path, rank=0, device=torch.device("cpu"))
    a = torch.randn(64, 64, requires_grad=True)
    for step in (1, 2, 3):
        with profiler.around(step):
            (a @ a).sum().backward()
    files = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert files == ["ops-step-2-rank-0.json", "ops-step-2-rank-0.txt", "trace-step-2-rank-0.json"]
    ops = json.loads((tmp_path / "profile" / "ops-step-2-rank-0.json").read_text())
    by_name = {op["name"]: op for op in ops}
    assert by_name["aten::mm"]["calls"] == 3  # the forward's product and the two of its backward
    assert ops == sorted(ops, key=lambda op: -op["self_ms"])
    assert "aten::mm" in (tmp_path / "profile" / "ops-step-2-rank-0.txt").read_text()
    trace = json.loads((tmp_path / "profile" / "trace-step-2-rank-0.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
