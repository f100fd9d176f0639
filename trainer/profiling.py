"""torch.profiler around chosen steps (metrics.profile_steps): where a step's time goes op by op.

Each profiled step writes, under output_dir/profile/:
  trace-step-N-rank-R.json  a Chrome trace (chrome://tracing or ui.perfetto.dev),
  ops-step-N-rank-R.txt     torch's table of the top ops by self time,
  ops-step-N-rank-R.json    the same ops as records (name, calls, self and total ms), for tools (the bench).
Off by default: the profiler itself slows the profiled step, so its step time is not a measurement.
"""

import contextlib
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 40


def top_ops(prof, device: torch.device, limit: int = TOP_OPS) -> list[dict]:
    """The ops with the most self time (the device's where there is one), as plain records."""
    on_device = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
        total_us = event.device_time_total if on_device else event.cpu_time_total
        rows.append({"name": event.key, "calls": event.count, "self_ms": self_us / 1000, "total_ms": total_us / 1000})
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return rows[:limit]


@contextlib.contextmanager
def profiled(device: torch.device, done):
    """Profiles the block (CPU, and CUDA on a GPU), then hands the profile to done(prof)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    done(prof)


class StepProfiler:
    def __init__(self, steps: list[int], output_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank, self.device = set(steps), rank, device
        self.dir = Path(output_dir) / "profile"

    def around(self, step: int):
        """A context for the whole of step `step` (data, forward, backward, optimizer, logging)."""
        if step not in self.steps:
            return contextlib.nullcontext()
        return profiled(self.device, lambda prof: self._write(step, prof))

    def _write(self, step: int, prof) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step}-rank-{self.rank}"
        prof.export_chrome_trace(str(self.dir / f"trace-{name}.json"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.dir / f"ops-{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS) + "\n")
        (self.dir / f"ops-{name}.json").write_text(json.dumps(top_ops(prof, self.device), indent=1) + "\n")
