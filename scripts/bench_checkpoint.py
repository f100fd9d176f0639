"""Checkpoint save time and the time training is blocked, sync vs async, against checkpoint size.

    .venv/bin/python scripts/bench_checkpoint.py

Real train.py runs on 2 ranks (FSDP2 over gloo); each saves every 2 steps for 6 steps. The figures are
means over the three saves of each run, read from the run's own report lines
("checkpoint: step-N complete: ... MiB, training blocked ... s, written in ... s").
"""

import re

from bench_common import header

from tests.helpers import run_train

SIZES = {  # model overrides -> about 12 bytes per parameter (fp32 weights + AdamW's two moments)
    "0.8M params": [],
    "25M params": ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4"],
    "101M params": ["model.dim=1024", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4"],
}
REPORT = re.compile(r"complete: ([\d.]+) MiB, training blocked ([\d.]+) s, written in ([\d.]+) s")


def main() -> None:
    print(header("scripts/bench_checkpoint.py (2 ranks, save every 2 steps)"))
    print("| model | checkpoint size (MiB) | mode | training blocked (s) | written in (s) |")
    print("|---|---|---|---|---|")
    for name, model in SIZES.items():
        for mode in ("sync", "async"):
            import tempfile

            with tempfile.TemporaryDirectory() as out:
                result = run_train(
                    ["--config", "configs/debug.yaml", "training.steps=6", "training.seq_len=64", "checkpoint.interval=2",
                     "checkpoint.keep_last=1", f"checkpoint.async_save={mode == 'async'}", f"job.output_dir={out}", *model],
                    nproc=2,
                )
            reports = [tuple(map(float, m)) for m in REPORT.findall(result.stdout)]
            if result.returncode != 0 or not reports:
                print(f"| {name} | | {mode} | failed: {result.stderr.strip().splitlines()[-1][:100]} |")
                continue
            size, blocked, written = (sum(r[i] for r in reports) / len(reports) for i in range(3))
            print(f"| {name} | {size:.0f} | {mode} | {blocked:.3f} | {written:.3f} |", flush=True)


if __name__ == "__main__":
    main()
