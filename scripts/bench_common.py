"""Running train.py for benchmarks and reading its TensorBoard scalars back."""

import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import run_train, tensorboard_scalars, tensorboard_tags  # noqa: E402


def header(command: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{datetime.date.today()} | {platform.node()} | {device} | torch {torch.__version__} | {command}"


def measure(overrides: list[str], nproc: int, skip_steps: int, env: dict | None = None) -> dict[str, float] | str:
    """Means over the log points after `skip_steps` (start-up and compilation excluded); an error line on failure."""
    with tempfile.TemporaryDirectory() as out:
        result = run_train([*overrides, f"job.output_dir={out}"], nproc=nproc, env=env)
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1][:120]

        def later(tag):
            if tag not in tensorboard_tags(Path(out)):
                return []
            return [v for s, v in tensorboard_scalars(Path(out), tag).items() if s > skip_steps]

        def mean(tag):
            values = later(tag)
            return sum(values) / len(values) if values else None

        return {
            "step_ms": 1000 * mean("time/step_seconds"),
            "tokens_per_sec": mean("throughput/tokens_per_sec_per_device"),
            "mfu": mean("throughput/mfu_percent"),
            "peak_gib": max(later("memory/peak_gib")),
            # Only runs with a fast matmul format (float8) log these.
            "mfu_mixed": mean("throughput/mfu_mixed_percent"),
            "float8_share": mean("throughput/float8_flop_share"),
        }
