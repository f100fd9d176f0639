"""One command for a run on this machine: train.py under torchrun with one process per GPU (or --nproc
on CPU), the cores shared out as OMP_NUM_THREADS, and every rank's output kept under the run's
output directory (logs/start-N/...), besides the console.

    python -m launch local [--nproc N] --config configs/debug.yaml [dotted.key=value ...]
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def output_dir(config: str, overrides: list[str]) -> Path | None:
    """The run's resolved job.output_dir, asked of train.py (launch/ talks to the trainer through its
    command line only); None after train.py reported a bad config on stderr."""
    found = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", config, "--print-output-dir", *overrides],
                           stdout=subprocess.PIPE, text=True)
    return Path(found.stdout.strip()) if found.returncode == 0 else None


def default_nproc() -> int:
    """One process per visible GPU; 1 without GPUs (CPU runs choose theirs with --nproc)."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def torchrun_command(nproc: int, config: str, overrides: list[str], log_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        # Each rank's stdout and stderr in a file of its own, and on the console as well.
        "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3",
        str(REPO / "train.py"), "--config", config, *overrides,
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="train on this machine under torchrun")
    local.add_argument("--nproc", type=int, default=None, help="processes (default: one per GPU, or 1)")
    local.add_argument("--config", required=True)
    local.add_argument("overrides", nargs="*")
    out = sub.add_parser("output-dir", help="print the run's job.output_dir")
    out.add_argument("--config", required=True)
    out.add_argument("overrides", nargs="*")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    out = output_dir(args.config, args.overrides)
    if out is None:
        return 2
    if args.command == "output-dir":
        print(out)
        return 0
    nproc = args.nproc or default_nproc()
    if nproc < 1:
        print(f"error: --nproc {nproc} must be at least 1", file=sys.stderr)
        return 2
    # The config, data, layout for nproc ranks and the checkpoint to resume, checked once.
    check = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", args.config, "--check",
                            "--world-size", str(nproc), *args.overrides])
    if check.returncode != 0:
        return check.returncode
    starts = out / "logs"
    log_dir = starts / f"start-{len(list(starts.glob('start-*'))) + 1 if starts.is_dir() else 1}"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"launch: {nproc} process(es), OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, rank logs under {log_dir}", flush=True)
    return subprocess.run(torchrun_command(nproc, args.config, args.overrides, log_dir), env=env).returncode
