"""What a run reports: one console line per log step, TensorBoard scalars, and a live progress line.

Only rank 0 writes. Throughput and MFU are averaged over the steps since the last log line, so a slow
first step (allocator warm-up) shows once and does not skew later lines.
"""

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.schema import MetricsConfig
from trainer.run_record import RunRecord

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, SXM parts).
_GPU_PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024, trials: int = 5, repeats: int = 3) -> float:
    """A large matmul's best TFLOP/s over several trials: the stand-in for 'peak' where no datasheet figure
    applies (CPU). The best, not the mean, because a busy moment only ever makes a trial slower.

    Its inputs come from a generator of its own: the global RNG may just have been restored from a
    checkpoint, and drawing from it here would move every later dropout mask (an inexact resume)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e12


def peak_tflops(cfg: MetricsConfig, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(TFLOP/s, where the figure came from)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops, "metrics.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value, f"{name} datasheet bf16"
    return measure_matmul_tflops(device, dtype), f"measured {dtype} matmul on {device.type}, best of 5: approximate"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def tokens_label(tokens: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.2f}{unit}"
    return str(tokens)


@dataclass(frozen=True)
class FastFlops:
    """The part of the model's FLOPs that runs in a faster number format (float8). The model's FLOPs do
    not change with it, so MFU stays against the high-precision peak; `mixed` adds an MFU against what
    the device could do on this mix: those FLOPs at the fast peak, the rest at the high-precision one."""

    fmt: str  # "float8"
    share: float  # of the model's FLOPs per token
    peak_ratio: float  # the fast format's peak over the high-precision peak

    def mixed(self, mfu: float) -> float:
        return mfu * ((1 - self.share) + self.share / self.peak_ratio)


class MetricsLogger:
    def __init__(
        self, cfg: MetricsConfig, output_dir: Path, *, is_main: bool, total_steps: int, flops_per_token: int,
        peak_tflops: float, device: torch.device, peak_source: str = "metrics.peak_tflops", start_step: int = 0,
        rank: int = 0, fast_flops: "FastFlops | None" = None, record: RunRecord | None = None,
    ):
        self.cfg, self.is_main, self.total_steps = cfg, is_main, total_steps
        self.fast, self.record = fast_flops, record or RunRecord(None)
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_tflops * 1e12, device
        self.peak_source, self.start_step = peak_source, start_step
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
        self._tokens, self._time, self._steps, self._data_time = 0, 0.0, 0, 0.0
        self._phases: dict[str, float] = {}
        self._started = time.perf_counter()

    def start_clock(self) -> None:
        """Elapsed time and the ETA count from here: the start of this process's training loop."""
        self._started = time.perf_counter()

    def _mfu(self, tokens_per_sec: float) -> float:
        """Percent of the peak, never above 100. A measured peak is only a lower bound of what the device
        can do: when training beats it, training's rate is the better bound. A configured peak that
        training beats is wrong, and said so once."""
        achieved = tokens_per_sec * self.flops_per_token
        if achieved > self.peak_flops:
            if self.is_main:
                if self.peak_source.startswith("measured"):
                    print(f"metrics: training ran at {achieved / 1e12:.3f} TFLOP/s, above the measured peak "
                          f"{self.peak_flops / 1e12:.3f}; MFU is now against the higher figure", flush=True)
                else:
                    print(f"metrics: training ran at {achieved / 1e12:.3f} TFLOP/s, above the peak "
                          f"{self.peak_flops / 1e12:.3f} ({self.peak_source}): set metrics.peak_tflops to the "
                          f"device's real peak", flush=True)
            self.peak_flops = achieved
        return 100 * achieved / self.peak_flops

    def maybe_log(
        self, step: int, *, loss: float, lr: float, grad_norm: float, local_tokens: int, step_time: float,
        tokens_seen: int = 0, window_ids: list[tuple[int, int]] = (), loss_parts: dict[str, float] | None = None,
        data_time: float = 0.0, phases: dict[str, float] | None = None, extra: dict[str, float] | None = None,
    ) -> None:
        """`loss_parts`: named terms of a loss made of several (distillation's ce and kl), per label token.
        `data_time`: the part of step_time spent waiting for the step's batches. `phases`: seconds of the
        step's phases (metrics.step_phases), averaged over the log window into TensorBoard."""
        loss_parts = loss_parts or {}
        if self.samples is not None:
            self.samples.write(json.dumps({"step": step, "windows": [list(w) for w in window_ids]}) + "\n")
            self.samples.flush()
        self._tokens += local_tokens
        self._time += step_time
        self._data_time += data_time
        for name, seconds in (phases or {}).items():
            self._phases[name] = self._phases.get(name, 0.0) + seconds
        self._steps += 1
        if self.progress:
            done = int(30 * step / self.total_steps)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total_steps} loss {loss:.4f}", end="", flush=True)
        if not (step == 1 or step % self.cfg.log_every == 0 or step == self.total_steps):
            return
        tokens_per_sec = self._tokens / self._time
        mfu = self._mfu(tokens_per_sec)
        memory = peak_memory_gib(self.device)
        step_avg = self._time / self._steps
        data_percent = 100 * self._data_time / self._time
        phase_ms = {name: 1000 * seconds / self._steps for name, seconds in self._phases.items()}
        self._phases = {}
        self._tokens, self._time, self._steps, self._data_time = 0, 0.0, 0, 0.0
        elapsed = time.perf_counter() - self._started
        eta = elapsed / max(1, step - self.start_step) * (self.total_steps - step)
        if not self.is_main:
            return
        if self.progress:
            print("\r" + " " * 80 + "\r", end="")
        parts = f" ({', '.join(f'{k} {v:.4f}' for k, v in loss_parts.items())})" if loss_parts else ""
        mixed = f" | mfu_mixed {self.fast.mixed(mfu):5.2f}%" if self.fast else ""
        shown = {tag: v for tag, v in (extra or {}).items() if tag.count("/") == 1}
        groups = {tag.split("/")[0] for tag in shown}
        more = "".join(f" | {g} " + " ".join(f"{t.split('/')[1]} {v:.4f}" for t, v in shown.items() if t.startswith(g + "/"))
                       for g in sorted(groups))
        print(
            f"step {step:>6} | loss {loss:8.4f}{parts} | lr {lr:.3e} | grad_norm {grad_norm:8.4f} | "
            f"tok/s/device {tokens_per_sec:9.1f} | mfu {mfu:5.2f}%{mixed} | mem {memory:6.2f} GiB | "
            f"step {step_avg * 1000:7.1f} ms (data {data_percent:4.1f}%) | tokens {tokens_label(tokens_seen)} | elapsed {clock(elapsed)} | eta {clock(eta)}{more}",
            flush=True,
        )
        scalars = {
            "loss/train": loss, "lr": lr, "grad_norm": grad_norm, "throughput/tokens_per_sec_per_device": tokens_per_sec,
            "throughput/mfu_percent": mfu, "memory/peak_gib": memory, "time/step_seconds": step_avg,
            "time/data_wait_percent": data_percent,
            "progress/tokens_seen": tokens_seen, "time/elapsed_seconds": elapsed, "time/eta_seconds": eta,
        }
        if self.device.type == "cuda":  # what tensors held at most, beside what the caching allocator reserved
            scalars["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        scalars.update({f"loss/{name}": value for name, value in loss_parts.items()})
        scalars.update(extra or {})
        scalars.update({f"time/phase_{name}_ms": value for name, value in phase_ms.items()})
        if self.fast:
            scalars["throughput/mfu_mixed_percent"] = self.fast.mixed(mfu)
            scalars[f"throughput/{self.fast.fmt}_flop_share"] = self.fast.share
        self.record.write("step", step, **scalars)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def log_eval(self, step: int, *, loss: float, tokens: int, seconds: float, samples: list[tuple[str, str]],
                 variants: dict[str, float] | None = None) -> None:
        """A validation's line, its TensorBoard scalars, and its samples (console and TensorBoard text).
        `variants`: the held-out loss of the model computed another way (rounded as a quantized export,
        or in high precision), by label."""
        if not self.is_main:
            return
        variants = variants or {}
        ppl = math.exp(loss) if loss < 80 else float("inf")
        if self.progress:
            print("\r" + " " * 80 + "\r", end="")
        others = "".join(f" | {label} {value:.4f} ({math.exp(min(value, 80)):.3f})" for label, value in variants.items())
        print(f"eval {step:>6} | loss {loss:8.4f} | perplexity {ppl:10.3f}{others} | tokens {tokens_label(tokens)} | "
              f"{seconds:.1f} s", flush=True)
        for prompt, text in samples:
            print(f"sample {step:>6} | {prompt!r} -> {text!r}", flush=True)
        self.record.write("eval", step, loss=loss, perplexity=ppl, tokens=tokens, seconds=seconds,
                          samples=[list(s) for s in samples], **{f"loss_{k}": v for k, v in variants.items()})
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, step)
            self.writer.add_scalar("eval/perplexity", ppl, step)
            for label, value in variants.items():
                self.writer.add_scalar(f"eval/loss_{label}", value, step)
                self.writer.add_scalar(f"eval/perplexity_{label}", math.exp(min(value, 80)), step)
            for i, (prompt, text) in enumerate(samples):
                self.writer.add_text(f"eval/sample_{i}", f"**{prompt}**{text}", step)
            self.writer.flush()

    def close(self) -> None:
        self.record.close()
        if self.samples is not None:
            self.samples.close()
        if self.progress:
            print()
        if self.writer is not None:
            self.writer.close()
