"""One command for a run on this machine: train.py under torchrun with one process per GPU (or --nproc
on CPU), the cores shared out as OMP_NUM_THREADS, and every rank's output kept under the run's
output directory (logs/start-N/...), besides the console.

    python -m launch local [--nproc N] [--max-restarts N] --config configs/debug.yaml [dotted.key=value ...]

The console shows the ranks' lines; torchrun's own (its banners, and the tracebacks it prints when a rank
stops) are kept back, and a failed rank is reported by its exit code and where its log is. Ctrl-C (or
SIGTERM) is handed to every rank as SIGTERM: each finishes its step, saves and stops, and this exits 75
like train.py; a second Ctrl-C stops everything at once (exit 130). With --max-restarts N, a rank that
fails (or a hang the watchdog ends, exit 124) restarts every rank in place, up to N times, and the run
resumes from its last committed checkpoint (torchrun's own restarts; docs/fault_tolerance.md).

With --replica-groups G (torchft): a Lighthouse, then G torchrun jobs of --nproc ranks each, replica group I
with fault.replica_id=I and its output under job.output_dir/replica-I; each group restarts on its own
(--max-restarts) and rejoins the others with a live peer's state. The console prefixes each group's lines.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from trainer.cli import EXIT_INTERRUPTED, Parser, at_least  # standard library only: no trainer, no torch

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


def torchrun_command(nproc: int, config: str, overrides: list[str], log_dir: Path, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "--max-restarts", str(max_restarts),
        # Each rank's stdout and stderr in a file of its own, and on the console as well.
        "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3",
        str(REPO / "train.py"), "--config", config, *overrides,
    ]


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m launch", description="Training on this machine under torchrun.")
    sub = parser.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="train on this machine under torchrun")
    local.add_argument("--nproc", type=at_least(1), default=None, help="processes (default: one per GPU, or 1)")
    local.add_argument("--max-restarts", type=at_least(0), default=0,
                       help="restart every rank in place after a failure or a hang, up to N times (default 0)")
    local.add_argument("--replica-groups", type=at_least(1), default=1,
                       help="replica groups that survive each other's failures (torchft; default 1: off)")
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
    nproc = default_nproc() if args.nproc is None else args.nproc
    if args.replica_groups > 1:
        return run_replica_groups(args, nproc)
    # The config, data, layout for nproc ranks and the checkpoint to resume, checked once.
    check = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", args.config, "--check",
                            "--world-size", str(nproc), *args.overrides])
    if check.returncode != 0:
        return check.returncode
    starts = out / "logs"
    log_dir = starts / f"start-{len(list(starts.glob('start-*'))) + 1 if starts.is_dir() else 1}"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))  # the cores we may use
    for marker in ("HUNG", "FAILED"):  # what an earlier start left must not speak for this one
        (out / marker).unlink(missing_ok=True)
    print(f"launch: {nproc} process(es), OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, rank logs under {log_dir}", flush=True)
    code, own = run_torchrun(torchrun_command(nproc, args.config, args.overrides, log_dir, args.max_restarts), env)
    if (out / "PREEMPTED").is_file():
        return EXIT_PREEMPTED  # the ranks said where they stopped and what they saved
    if code == EXIT_INTERRUPTED:
        print("launch: stopped at once by a second Ctrl-C; the last complete checkpoint stays", file=sys.stderr)
        return code
    if code != 0:
        # torchrun reports each failed rank as "rank : R ... exitcode : C"; the rank's own error line came first.
        failed = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", "".join(own), re.S)
        rank, code = (int(failed.group(1)), int(failed.group(2))) if failed else ("?", code)
        hung = f" (a hang: the watchdog's stack files are under {out / 'hangs'})" if (out / "HUNG").is_file() else ""
        restarts = f" after {args.max_restarts} in-job restart(s)" if args.max_restarts else ""
        print(f"launch: rank {rank} exited with code {code}{hung}{restarts}; every rank's output is under {log_dir}",
              file=sys.stderr)
    return code


EXIT_PREEMPTED = 75
# A rank's line as torchrun's --tee prints it: "[default0]:...".
_RANK_LINE = re.compile(r"^\[default\d+\]:")


def run_torchrun(command: list[str], env: dict) -> tuple[int, list[str]]:
    """torchrun in a process group of its own, so that a terminal's Ctrl-C reaches this process alone and is
    handed on as torchrun understands it (SIGTERM, which it forwards to every rank). Returns its exit code
    and its own lines (not the ranks')."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    interrupts, own = [], []

    def forward(signum, frame):
        interrupts.append(signum)
        if interrupts.count(signal.SIGINT) > 1:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)

    def pump(stream, to):
        for line in stream:
            if _RANK_LINE.match(line):
                to.write(line)
                to.flush()
            else:
                own.append(line)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout)), threading.Thread(target=pump, args=(proc.stderr, sys.stderr))]
    try:
        for thread in pumps:
            thread.start()
        code = proc.wait()
        for thread in pumps:
            thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return (EXIT_INTERRUPTED if interrupts.count(signal.SIGINT) > 1 else code), own


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_replica_groups(args, nproc: int) -> int:
    """A torchft Lighthouse and one torchrun per replica group, side by side; the worst exit code."""
    lighthouse_bin = Path(sys.executable).with_name("torchft_lighthouse")
    if not lighthouse_bin.is_file():
        print(f"error: --replica-groups needs torchft (its torchft_lighthouse is not beside {sys.executable}): "
              f"pip install torchft", file=sys.stderr)
        return 2
    port = _free_port()
    # A group that is restarting must not hold the others' quorum up for long: join_timeout 1 s.
    lighthouse = subprocess.Popen([str(lighthouse_bin), "--bind", f"[::]:{port}", "--min_replicas", "1",
                                   "--join_timeout_ms", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://localhost:{port}"
    groups = [[*args.overrides, f"fault.replica_groups={args.replica_groups}", f"fault.replica_id={i}",
               f"fault.lighthouse={address}"] for i in range(args.replica_groups)]
    try:
        check = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", args.config, "--check",
                                "--world-size", str(nproc), *groups[0]])
        if check.returncode != 0:
            return check.returncode
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // (nproc * args.replica_groups))))
        procs, pumps = [], []
        for i, overrides in enumerate(groups):
            out = output_dir(args.config, overrides)
            starts = out / "logs"
            log_dir = starts / f"start-{len(list(starts.glob('start-*'))) + 1 if starts.is_dir() else 1}"
            print(f"launch: replica group {i}: {nproc} process(es), rank logs under {log_dir}", flush=True)
            proc = subprocess.Popen(torchrun_command(nproc, args.config, overrides, log_dir, args.max_restarts),
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            procs.append(proc)
            pumps.append(threading.Thread(target=_prefixed, args=(proc.stdout, f"[replica {i}]")))
            pumps[-1].start()

        def forward(signum, frame):
            for proc in procs:
                proc.send_signal(signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = [proc.wait() for proc in procs]
            for pump in pumps:
                pump.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        for i, code in enumerate(codes):
            if code:
                print(f"launch: replica group {i} exited with code {code}", file=sys.stderr)
        return max(codes)
    finally:
        lighthouse.terminate()
        lighthouse.wait()


def _prefixed(stream, prefix: str) -> None:
    """A group's ranks' lines, each under its group's name; torchrun's own lines are left out."""
    for line in stream:
        if _RANK_LINE.match(line):
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()
