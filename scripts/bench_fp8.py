"""Float8 against bf16 at one shape: tokens/s, MFU against the bf16 peak, the float8 share of the FLOPs,
MFU against the mixed peak, peak memory; prints a markdown table.

    .venv/bin/python scripts/bench_fp8.py --preset llama3_1_8b          # a GPU node: FSDP over its GPUs
    .venv/bin/python scripts/bench_fp8.py --preset cpu-tiny --no-compile --steps 6   # emulated, how tests run it

Every row is a real train.py run (torchrun for several ranks) with FSDP and selective activation
checkpointing, on the Python standard library's source read byte by byte (no download, no tokenizer
file); the Llama shapes keep the Llama 3 vocabulary size, so the output head costs what it costs in a
real run. Figures are means over the log points after the first `--skip` steps, which hold start-up
and compilation.
"""

import argparse

import torch
from bench_common import header, measure

# The shared settings of each preset: the flavor at its real sequence length and vocabulary.
PRESETS = {
    "llama3_2_1b": ["model.flavor=llama3_2_1b", "training.seq_len=8192", "training.local_batch_size=1",
                    "training.mixed_precision_param=bfloat16", "activation_checkpoint.mode=selective_op",
                    "model.vocab_size=128256"],
    "llama3_1_8b": ["model.flavor=llama3_1_8b", "training.seq_len=8192", "training.local_batch_size=1",
                    "training.mixed_precision_param=bfloat16", "activation_checkpoint.mode=selective_op",
                    "model.vocab_size=128256"],
    # CPU: the debug shape with float8 emulated (fp32 matmuls of float8-rounded operands); it checks that
    # every row runs and reports, not speed.
    "cpu-tiny": ["model.flavor=debug", "training.seq_len=256", "training.local_batch_size=2",
                 "training.mixed_precision_param=float32", "activation_checkpoint.mode=selective_op",
                 "fp8.emulate=true"],
}
COMMON = ["--config", "configs/debug.yaml", "tokenizer.kind=byte", "data.source=stdlib", "data.num_streams=8",
          "training.global_batch_size=-1", "lr_scheduler.warmup_steps=2",
          "checkpoint.enabled=false"]
# (label, compiled, overrides)
ROWS = [
    ("high precision, eager", False, ["fp8.enabled=false"]),
    ("high precision + compile", True, ["fp8.enabled=false"]),
    ("float8 tensorwise + float8 all-gather + compile", True,
     ["fp8.enabled=true", "fp8.recipe=tensorwise", "fp8.fsdp_float8_all_gather=true"]),
    ("float8 rowwise + compile", True, ["fp8.enabled=true", "fp8.recipe=rowwise"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3_1_8b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="log points at or before this step are not counted")
    parser.add_argument("--nproc", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--no-compile", action="store_true", help="run the compiled rows eagerly (CPU smoke runs)")
    parser.add_argument("overrides", nargs="*", help="extra dotted.key=value settings for every row")
    args = parser.parse_args()
    if args.skip >= args.steps:
        parser.error(f"--skip {args.skip} leaves no timed steps of --steps {args.steps}")

    print(header(f"bench_fp8 --preset {args.preset} --nproc {args.nproc} --steps {args.steps} "
                 f"{'--no-compile ' if args.no_compile else ''}{' '.join(args.overrides)}"))
    print("| row | tokens/s per device | vs high precision + compile | MFU % (bf16 peak) | float8 FLOP share | "
          "MFU % (mixed peak) | peak mem (GiB) |")
    print("|---|---|---|---|---|---|---|")
    log_every = max(1, min(5, args.steps - args.skip))
    baseline = None
    for label, compiled, row in ROWS:
        compiled = compiled and not args.no_compile
        if not compiled and label.endswith("+ compile"):
            label = label.removesuffix(" + compile") + " (eager: --no-compile)"
        overrides = [*COMMON, *PRESETS[args.preset], *row, f"compile.enabled={str(compiled).lower()}",
                     f"training.steps={args.steps}", f"metrics.log_every={log_every}", *args.overrides]
        m = measure(overrides, args.nproc, skip_steps=args.skip)
        if isinstance(m, str):
            print(f"| {label} | failed: {m} | | | | | |", flush=True)
            continue
        if row == ["fp8.enabled=false"] and (compiled or args.no_compile):
            baseline = m["tokens_per_sec"]
        ratio = f"{m['tokens_per_sec'] / baseline:.2f}x" if baseline else "-"
        share = f"{100 * m['float8_share']:.1f} %" if m["float8_share"] is not None else "-"
        mixed = f"{m['mfu_mixed']:.1f}" if m["mfu_mixed"] is not None else "-"
        print(f"| {label} | {m['tokens_per_sec']:,.0f} | {ratio} | {m['mfu']:.1f} | {share} | {mixed} | "
              f"{m['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
