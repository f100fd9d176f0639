"""Where a step's wall time goes: waiting for data, forward (the model and the loss), backward, the
optimizer (clipping, the update, converters' hooks), and everything else (the host syncs that read the
loss and the norm, logging, checkpoints' bookkeeping). Off by default (metrics.step_phases): on a GPU
each phase boundary synchronizes the device, which costs a little. The benchmark turns it on.

With pipeline stages the schedule runs forward and backward together: both count as forward."""

import contextlib
import time

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class StepPhases:
    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.sync = enabled, enabled and device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def start_step(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def phase(self, name: str):
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start

    def of_step(self, step_seconds: float) -> dict[str, float]:
        """Each phase's seconds, with "other" the rest of the step (empty when off)."""
        if not self.enabled:
            return {}
        return {**self.seconds, "other": max(0.0, step_seconds - sum(self.seconds.values()))}
