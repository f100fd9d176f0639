"""How the calibration times a piece of work: the median of a few calls after a warm-up."""

import statistics
import time

import torch


def seconds(fn, trials: int, sync, best: bool = False) -> float:
    """The median of `trials` timed calls after a warm-up (the best where `best`): training runs its kernels
    back to back with others between them, so a rate it can keep up, not a lucky one."""
    fn()  # warm-up
    times = []
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def synchronizer(device: torch.device):
    """What waits for the device's queued work (nothing on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
