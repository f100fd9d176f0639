"""What a run reports: one console line per log step, TensorBoard scalars, and a live progress line.

Only rank 0 writes. Throughput and MFU are averaged over the steps since the last log line, so a slow
first step (allocator warm-up) shows once and does not skew later lines.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch

from trainer.config.schema import MetricsConfig

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, SXM parts).
_GPU_PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8) -> float:
    """A large matmul's achieved TFLOP/s: the stand-in for 'peak' where no datasheet figure applies (CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def peak_tflops(cfg: MetricsConfig, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(TFLOP/s, where the figure came from)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops, "metrics.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name} datasheet bf16"
    return measure_matmul_tflops(device, dtype), f"measured {dtype} matmul on {device.type}"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    def __init__(
        self, cfg: MetricsConfig, output_dir: Path, *, is_main: bool, total_steps: int, flops_per_token: int,
        peak_tflops: float, device: torch.device, start_step: int = 0, rank: int = 0,
    ):
        self.cfg, self.is_main, self.total_steps = cfg, is_main, total_steps
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_tflops * 1e12, device
        self.writer = None
        if is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run replaces what an interrupted one logged after its checkpoint.
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.samples = None
        if cfg.log_samples:
            (output_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.samples = open(output_dir / "samples" / f"rank-{rank}.jsonl", "a")
        self.progress = is_main and (cfg.progress == "on" or (cfg.progress == "auto" and sys.stdout.isatty()))
        self._tokens, self._time, self._steps = 0, 0.0, 0

    def maybe_log(
        self, step: int, *, loss: float, lr: float, grad_norm: float, local_tokens: int, step_time: float,
        window_ids: list[tuple[int, int]] = (),
    ) -> None:
        if self.samples is not None:
            self.samples.write(json.dumps({"step": step, "windows": [list(w) for w in window_ids]}) + "\n")
            self.samples.flush()
        self._tokens += local_tokens
        self._time += step_time
        self._steps += 1
        if self.progress:
            done = int(30 * step / self.total_steps)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total_steps} loss {loss:.4f}", end="", flush=True)
        if not (step == 1 or step % self.cfg.log_every == 0 or step == self.total_steps):
            return
        tokens_per_sec = self._tokens / self._time
        mfu = 100 * tokens_per_sec * self.flops_per_token / self.peak_flops
        memory = peak_memory_gib(self.device)
        step_avg = self._time / self._steps
        self._tokens, self._time, self._steps = 0, 0.0, 0
        if not self.is_main:
            return
        if self.progress:
            print("\r" + " " * 80 + "\r", end="")
        print(
            f"step {step:>6} | loss {loss:8.4f} | lr {lr:.3e} | grad_norm {grad_norm:8.4f} | "
            f"tok/s/device {tokens_per_sec:9.1f} | mfu {mfu:5.2f}% | mem {memory:6.2f} GiB | step {step_avg * 1000:7.1f} ms",
            flush=True,
        )
        if self.writer is not None:
            scalars = {
                "loss/train": loss, "lr": lr, "grad_norm": grad_norm, "throughput/tokens_per_sec_per_device": tokens_per_sec,
                "throughput/mfu_percent": mfu, "memory/peak_gib": memory, "time/step_seconds": step_avg,
            }
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
        if self.progress:
            print()
        if self.writer is not None:
            self.writer.close()
