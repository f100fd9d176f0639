"""python -m bench.long_context [--budget-gib 1.0] [--seq 8192,16384,24576,32768] [--cp 1,2] [--steps 2] [--config X]

Context parallelism against a memory budget, on this machine: for each cp degree and sequence length,
train.py trains one sequence per step (the debug model by default, its max_seq_len raised to the length)
with every rank held to --budget-gib of private memory (RLIMIT_DATA, what malloc and torch's CPU allocator
draw from; freed memory is returned at once, so the figure is live memory). A run that cannot allocate
within the budget is reported as such. Per run: trained or not, the peak resident memory of rank 0 (the
ranks are load-balanced alike), the step time of the last step and tokens/s per rank. The table shows the
longest sequence each cp degree trains within the budget, and the cost of splitting at lengths both can.
"""

import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.cli import Parser, at_least, integers, run_command

STEP = re.compile(r"tok/s/device\s+([\d.]+) .*\| mem\s+([\d.]+) GiB \| step\s+([\d.]+) ms")


def _limit(budget_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
    return apply


def run_one(config: str, seq: int, cp: int, steps: int, budget_gib: float, out: Path) -> dict:
    args = [
        "train.py", "--config", config, f"training.steps={steps}", "metrics.log_every=1", f"job.output_dir={out}",
        "checkpoint.enabled=false", f"model.max_seq_len={seq}", f"training.seq_len={seq}", "training.local_batch_size=1",
        "training.global_batch_size=1", "training.cpu_malloc=system", "data.prefetch=0", f"parallel.cp={cp}",
        "metrics.progress=off",
    ]
    command = [sys.executable, *args] if cp == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}", *args]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cp))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=_limit(int(budget_gib * 2**30)))
    steps_seen = STEP.findall(result.stdout)
    row = {"cp": cp, "seq": seq, "trained": result.returncode == 0 and len(steps_seen) == steps}
    if steps_seen:
        tokens, mem, ms = (float(x) for x in steps_seen[-1])
        row.update(tok_s=tokens, mem_gib=mem, step_ms=ms)
    if not row["trained"]:
        text = result.stdout + result.stderr
        row["why"] = "out of memory in the budget" if "can't allocate memory" in text or "MemoryError" in text else \
            (text.strip().splitlines() or ["?"])[-1][:120]
    return row


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.long_context", description=__doc__.split("\n\n")[1])
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--seq", type=integers(1), default="8192,16384,24576,32768")
    parser.add_argument("--cp", type=integers(1), default="1,2")
    parser.add_argument("--steps", type=at_least(1), default=2)
    parser.add_argument("--config", default="configs/debug.yaml")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    seqs, degrees = args.seq, args.cp
    print(f"one sequence per step, {args.config}, every rank within {args.budget_gib} GiB of private memory "
          f"(RLIMIT_DATA), {os.cpu_count()} cores shared by the ranks", flush=True)
    print("| cp | seq_len | trained | peak RSS rank 0 (GiB) | step (ms) | tokens/s per rank |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for cp in degrees:
            for seq in seqs:
                row = run_one(args.config, seq, cp, args.steps, args.budget_gib, Path(tmp) / f"cp{cp}-{seq}")
                trained = "yes" if row["trained"] else f"no ({row['why']})"
                mem = f"{row['mem_gib']:.2f}" if "mem_gib" in row else "-"
                ms = f"{row['step_ms']:.0f}" if "step_ms" in row else "-"
                tok = f"{row['tok_s']:.0f}" if "tok_s" in row else "-"
                print(f"| {cp} | {seq} | {trained} | {mem} | {ms} | {tok} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
