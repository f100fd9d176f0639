"""Stragglers: every rank's step time and compute time each step, in TensorBoard per rank, and a console
warning naming a rank whose compute time stays above fault.straggler_factor times the ranks' median.

Wall-clock step times are equal on every rank (each collective waits for the slowest), so they cannot say
who is slow; what each rank computed can. Compute time is:
  - on CPU, the process's CPU time over the step (every thread's): a gloo collective blocks without
    spinning, so time spent waiting for another rank is not in it;
  - on CUDA, the compute stream's time from the step's start to its end (CUDA events): it includes the
    stream's waits for collectives issued on it, so it separates a slow GPU less sharply than on CPU.
One all-reduce of three numbers per rank per step, on the default process group. Under pipeline parallelism
each rank is compared with the ranks of its own stage."""

import statistics
import time

import torch
import torch.distributed as dist


class StragglerWatch:
    def __init__(self, factor: float, steps: int, rank: int, world_size: int, device: torch.device, is_main: bool,
                 stage: int = 0):
        self.factor, self.patience, self.rank, self.world = factor, steps, rank, world_size
        # A rank is held against the ranks of its own pipeline stage: stages compute different layers (the
        # last one the head and the loss), so across stages unequal times are the layout, not a straggler.
        self.stage = stage
        self.device, self.is_main = device, is_main
        self.active = factor > 0 and world_size > 1 and dist.is_initialized()
        self.slow_steps = [0] * world_size  # steps in a row each rank has been over the line
        self._cpu, self._events = 0.0, None

    def start_step(self) -> None:
        if not self.active:
            return
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._cpu = time.process_time()

    def compute_so_far(self) -> float:
        """This rank's compute time since the step started (seconds)."""
        if self._events is not None:
            self._events[1].record()
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1]) / 1000
        return time.process_time() - self._cpu

    def end_step(self, step: int, step_time: float) -> dict[str, float]:
        """Gathers every rank's (step time, compute time); returns their TensorBoard scalars and warns."""
        if not self.active:
            return {}
        # A sum of rows each rank fills its own of: an all-gather, in the one collective every torch and
        # backend has without deprecation warnings.
        every = torch.zeros(self.world, 3, dtype=torch.float64, device=self.device)
        every[self.rank] = torch.tensor([step_time, self.compute_so_far(), self.stage], dtype=torch.float64)
        dist.all_reduce(every)
        times = every.tolist()
        compute = [c for _, c, _ in times]
        medians = {stage: statistics.median(c for _, c, s in times if s == stage) for _, _, stage in times}
        worst = 1.0
        for r, (_, c, stage) in enumerate(times):
            median = medians[stage]
            worst = max(worst, c / median if median > 0 else 1.0)
            self.slow_steps[r] = self.slow_steps[r] + 1 if median > 0 and c > self.factor * median else 0
            if self.slow_steps[r] == self.patience and self.is_main:
                of = "the ranks'" if len(medians) == 1 else f"pipeline stage {int(stage)}'s ranks'"
                print(f"straggler: rank {r} computed {c:.3f} s in step {step}, {c / median:.2f}x {of} median "
                      f"{median:.3f} s, for {self.patience} steps in a row (fault.straggler_factor={self.factor:g}); "
                      f"its per-rank times are under ranks/ in TensorBoard", flush=True)
        scalars = {f"ranks/step_seconds/rank_{r}": s for r, (s, _, _) in enumerate(times)}
        scalars.update({f"ranks/compute_seconds/rank_{r}": c for r, c in enumerate(compute)})
        scalars["ranks/compute_seconds/max_over_median"] = worst
        return scalars
