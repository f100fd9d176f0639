"""Our side of a row: train.py in a fresh process (torchrun for several ranks), its figures read back
from the record it writes (output_dir/metrics.jsonl: trainer/run_record.py), one point per step
(metrics.log_every=1, metrics.step_phases=true)."""

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.presets import METHODS, Preset

REPO = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "optimizer", "other")


def overrides(p: Preset, checkpoint: Path | None, method: str, steps: int, extra: list[str] = ()) -> list[str]:
    model = [f"model.flavor={p.flavor}", *p.model_overrides] if checkpoint is None else \
        ["model.flavor=null", f"model.init_from={checkpoint}"]
    return [
        "--config", "configs/debug.yaml", *model, "tokenizer.kind=byte",
        "data.source=stdlib", f"training.seq_len={p.seq}", f"training.local_batch_size={p.batch}",
        "training.global_batch_size=-1", f"training.mixed_precision_param={p.dtype}", f"training.steps={steps}",
        f"activation_checkpoint.mode={'full' if p.checkpointing else 'none'}", f"compile.enabled={str(p.compile).lower()}",
        "optimizer.lr=1e-4", "lr_scheduler.warmup_steps=0", "lr_scheduler.decay_type=constant", "metrics.log_every=1",
        "metrics.step_phases=true", "checkpoint.enabled=false", *METHODS[method][0], *extra,
    ]


def _command(args: list[str], nproc: int) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    return [*launcher, "train.py", *args]


def run(p: Preset, checkpoint: Path | None, method: str, steps: int, *, nproc: int = 1, env: dict | None = None,
        extra: list[str] = (), profile_step: int = 0) -> dict | str:
    """{"steps": {tag: [per step]}, "peak_gib": ..., "ops": [top ops of profile_step, rank 0], "saves": [each
    checkpoint's size and times]}, or the error's last line."""
    with tempfile.TemporaryDirectory() as out:
        profiling = [f"metrics.profile_steps=[{profile_step}]"] if profile_step else []
        args = [*overrides(p, checkpoint, method, steps, [*extra, *profiling]), f"job.output_dir={out}"]
        result = subprocess.run(_command(args, nproc), cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, **(env or {})})
        if result.returncode != 0:
            return (result.stderr.strip().splitlines() or ["failed"])[-1][:160]
        from trainer.run_record import read_records

        record = Path(out) / "metrics.jsonl"
        steps = [r for _, r in sorted(read_records(record, "step").items())]
        series = lambda tag: [r[tag] for r in steps]  # noqa: E731
        steps_of = {
            "step_ms": [1000 * v for v in series("time/step_seconds")],
            **{f"{name}_ms": series(f"time/phase_{name}_ms") for name in PHASES},
            "loss": series("loss/train"), "tokens_per_sec": series("throughput/tokens_per_sec_per_device"),
            "mfu": series("throughput/mfu_percent"), "peak_gib": series("memory/peak_gib"),
        }
        for name, tag in (("mfu_mixed", "throughput/mfu_mixed_percent"), ("float8_share", "throughput/float8_flop_share")):
            if tag in steps[0]:  # runs with a fast matmul format (float8) only
                steps_of[name] = series(tag)
        ops = Path(out) / "profile" / f"ops-step-{profile_step}-rank-0.json"
        saves = [{"mib": r["mib"], "blocked_s": r["blocked_s"], "written_s": r["written_s"]}
                 for _, r in sorted(read_records(record, "checkpoint").items())]
        allocated = series("memory/peak_allocated_gib") if "memory/peak_allocated_gib" in steps[0] else []
        return {"steps": steps_of, "peak_gib": max(series("memory/peak_gib")),
                "peak_allocated_gib": max(allocated) if allocated else None,
                "ops": json.loads(ops.read_text()) if profile_step else [], "saves": saves}


def dry_run_gib(p: Preset, checkpoint: Path | None, method: str, nproc: int = 1, extra: list[str] = ()) -> float:
    """The --dry-run estimate of the device memory per rank, for the same run (computed here, on meta); on
    CPU everything it counts (what is offloaded to the host included) and the process's own baseline."""
    import torch

    from trainer.config import load_config
    from trainer.dry_run import device_bytes, estimate_memory
    from trainer.plan import make_plan
    from trainer.precision import Precision

    args = overrides(p, checkpoint, method, 1, extra)
    cfg = load_config(REPO / args[1], args[2:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision.from_config(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, device)
    memory = estimate_memory(make_plan(cfg, nproc), precision)
    if torch.cuda.is_available():
        return device_bytes(memory) / 2**30
    # On CPU the host is the device: what is offloaded is in the same memory as the rest, and the live peak
    # (the process's resident memory) includes the process itself.
    return sum(memory.values()) / 2**30 + process_baseline_gib()


@functools.cache
def process_baseline_gib() -> float:
    """What a training process holds before it builds anything (the planner's calibration measures it)."""
    from trainer.planner.calibrate import process_bytes

    return process_bytes() / 2**30
