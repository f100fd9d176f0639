"""Throughput of the debug config per layout and precision; prints a markdown table.

    .venv/bin/python scripts/bench_throughput.py [--steps 40] [extra dotted.key=value ...]

Each row is a real train.py run (torchrun for several ranks). Step time and tokens/s are means over the
log windows after the first (which holds start-up costs), read back from the run's TensorBoard files.
"""

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import run_train, tensorboard_scalars  # noqa: E402

ROWS = [(1, "float32"), (2, "float32"), (1, "bfloat16"), (2, "bfloat16")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"{datetime.date.today()} | {platform.node()} | {device} | torch {torch.__version__} | {args.config} {' '.join(args.overrides)}")
    print("| ranks | precision | step time (ms) | tokens/s per device | tokens/s total | MFU % | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for nproc, precision in ROWS:
        with tempfile.TemporaryDirectory() as out:
            result = run_train(
                ["--config", args.config, f"training.steps={args.steps}", "metrics.log_every=10",
                 f"training.mixed_precision_param={precision}", f"job.output_dir={out}", *args.overrides],
                nproc=nproc,
            )
            if result.returncode != 0:
                print(f"| {nproc} | {precision} | failed: {result.stderr.strip().splitlines()[-1]} |")
                continue
            later = lambda tag: [v for s, v in tensorboard_scalars(Path(out), tag).items() if s > 10]  # noqa: E731
            step_ms = 1000 * sum(later("time/step_seconds")) / len(later("time/step_seconds"))
            tps = sum(later("throughput/tokens_per_sec_per_device")) / len(later("throughput/tokens_per_sec_per_device"))
            mfu = sum(later("throughput/mfu_percent")) / len(later("throughput/mfu_percent"))
            memory = max(later("memory/peak_gib"))
            print(f"| {nproc} | {precision} | {step_ms:.1f} | {tps:,.0f} | {tps * nproc:,.0f} | {mfu:.1f} | {memory:.2f} |", flush=True)


if __name__ == "__main__":
    main()
