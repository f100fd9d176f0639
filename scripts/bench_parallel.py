"""Step time and peak memory per activation-checkpointing mode and parallel layout; prints a markdown table.

    .venv/bin/python scripts/bench_parallel.py [--steps 8] [extra dotted.key=value ...]

The model is larger than the debug one (dim 512, 8 layers, seq 512, 4 sequences per rank) so that
activations dominate memory. Peak memory is rank 0's: max RSS on CPU (about 0.4 GiB of it is the
libraries), max reserved CUDA memory on a GPU. Each rank keeps 4 sequences (no accumulation), so rows
of one layout compare AC modes, and the sharded layouts show what they save per rank.
"""

import argparse

from bench_common import header, measure

MODEL = ["model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "training.seq_len=512",
         "training.local_batch_size=4", "training.global_batch_size=-1", "data.num_streams=8"]
LAYOUTS = {"single": (1, []), "dp_shard=2": (2, []), "tp=2": (2, ["parallel.tp=2"]), "pp=2 1f1b": (2, ["parallel.pp=2"])}
AC_MODES = ["none", "full", "selective_layer", "selective_op"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(header("scripts/bench_parallel.py " + " ".join(MODEL + args.overrides)))
    print("| layout | AC mode | step time (ms) | tokens/s per device | peak mem rank 0 (GiB) |")
    print("|---|---|---|---|---|")
    for layout, (nproc, layout_overrides) in LAYOUTS.items():
        for mode in AC_MODES:
            overrides = ["--config", "configs/debug.yaml", f"training.steps={args.steps}", "metrics.log_every=1",
                         f"activation_checkpoint.mode={mode}", *MODEL, *layout_overrides, *args.overrides]
            m = measure(overrides, nproc, skip_steps=2)
            if isinstance(m, str):
                print(f"| {layout} | {mode} | failed: {m} |", flush=True)
                continue
            print(f"| {layout} | {mode} | {m['step_ms']:.0f} | {m['tokens_per_sec']:,.0f} | {m['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
