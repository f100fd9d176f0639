"""Throughput of the debug config per number of ranks and precision; prints a markdown table.

    .venv/bin/python scripts/bench_throughput.py [--steps 40] [extra dotted.key=value ...]

Each row is a real train.py run (torchrun for several ranks); figures are means over the log windows
after the first, which holds start-up costs.
"""

import argparse

from bench_common import header, measure

ROWS = [(1, "float32"), (2, "float32"), (1, "bfloat16"), (2, "bfloat16")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(header(f"{args.config} {' '.join(args.overrides)}"))
    print("| ranks | precision | step time (ms) | tokens/s per device | tokens/s total | MFU % | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for nproc, precision in ROWS:
        overrides = ["--config", args.config, f"training.steps={args.steps}", "metrics.log_every=10",
                     f"training.mixed_precision_param={precision}", *args.overrides]
        m = measure(overrides, nproc, skip_steps=10)
        if isinstance(m, str):
            print(f"| {nproc} | {precision} | failed: {m} |")
            continue
        print(f"| {nproc} | {precision} | {m['step_ms']:.1f} | {m['tokens_per_sec']:,.0f} | "
              f"{m['tokens_per_sec'] * nproc:,.0f} | {m['mfu']:.1f} | {m['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
