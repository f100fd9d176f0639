"""What 4-bit weights cost a trained model, and how much of it QAT wins back: one base model finetuned three
times on the same data (plainly, with QAT int4_weight_only, with QAT int8_dynact_int4_weight), then the
held-out perplexity of each in high precision and rounded.

python -m bench.qat --base PATH --tokenizer PATH|byte --data PATH [--steps 300] [--group-size 32] [--seeds 0,1,2]
                    [--out DIR] [KEY=VALUE ...]

Rows: the plain finetune in high precision; rounded after training (post-training quantization, PTQ) to W4A16
and to int8-dynact-int4; the QAT finetunes, rounded as they trained. Each quantized row is held against the
plain one: its perplexity gap, and for QAT the share of the PTQ gap it closes. Also the bytes of the plain run's
bf16 export against its W4A16 export. KEY=VALUE overrides go to every finetune (e.g. optimizer.lr=1e-4).
Every number is a forward of the final weights over the same held-out windows (trainer/evaluate.py).

The gaps are thousandths of a nat on a small model, and two finetunes of the same base drift apart by about
as much as QAT wins: --seeds repeats the three finetunes per seed (job.seed: the order the data is read in),
and the table gives the mean over seeds, with each seed's share of the PTQ gap closed beside the mean.
"""

import argparse
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

from trainer.cli import Parser, at_least, integers, run_command

REPO = Path(__file__).resolve().parent.parent
RUNS = {"plain": [], "qat_w4": ["qat.scheme=int4_weight_only"], "qat_a8w4": ["qat.scheme=int8_dynact_int4_weight"]}


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.qat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the pretrained model (any form model.init_from reads)")
    parser.add_argument("--tokenizer", required=True, help="its tokenizer (tokenizer.path), or `byte`")
    parser.add_argument("--data", required=True, help="the finetuning text (data.source: a text file, or stdlib); 5%% of "
                        "its documents are held out (for a model pretrained with eval.split_fraction=0.05 on the same "
                        "source, the same documents it never saw)")
    parser.add_argument("--steps", type=at_least(1), default=300)
    parser.add_argument("--group-size", type=at_least(2), default=32)
    parser.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated job.seed values: the three "
                        "finetunes are repeated per seed and the table averages them (default 0)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-qat"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every finetune")
    return parser.parse_args(argv)


def _seeds(text: str) -> list[int]:
    seeds = integers(0)(text)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def finetune(name: str, seed: int, args) -> Path:
    out = args.out / (name if len(args.seeds) == 1 else f"seed-{seed}/{name}")
    command = [sys.executable, "train.py", "--config", "configs/debug.yaml", "model.flavor=null", f"model.init_from={args.base}",
               *(["tokenizer.kind=byte"] if args.tokenizer == "byte" else ["tokenizer.kind=auto", f"tokenizer.path={args.tokenizer}"]),
               f"data.source={args.data}",
               # A text file is one document: hold out paragraphs (the stdlib's documents are its files).
               *([] if args.data == "stdlib" else ["data.text_sample_by=paragraph"]),
               f"training.steps={args.steps}", f"checkpoint.interval={args.steps}", "eval.every=0", "eval.split_fraction=0.05",
               "eval.steps=8", f"qat.group_size={args.group_size}", "export.hf=true", "export.quantized=[w4a16]",
               "metrics.progress=off", f"job.output_dir={out}", f"job.seed={seed}", *RUNS[name], *args.overrides]
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"bench.qat: the {name} finetune failed (its output is above)")
    return out


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def losses_of(seed: int, args) -> tuple[dict[str, float], Path]:
    """Held-out loss of each row for one seed's three finetunes, and the plain run's directory."""
    from trainer.build import load_run
    from trainer.config import load_config
    from trainer.evaluate import held_out_loss
    from trainer.qat.export import quantized_model
    from trainer.qat.schemes import SCHEMES

    runs = {name: finetune(name, seed, args) for name in RUNS}
    plain = load_run(runs["plain"])
    qat = load_config(runs["plain"] / "config.yaml").qat
    losses = {"high precision": held_out_loss(runs["plain"], plain)}
    for label, scheme in (("PTQ W4A16", "int4_weight_only"), ("PTQ int8-dynact-int4", "int8_dynact_int4_weight")):
        losses[label] = held_out_loss(runs["plain"], quantized_model(plain, SCHEMES[scheme], dataclasses.replace(qat)))
    losses["QAT W4A16"] = held_out_loss(runs["plain"], load_run(runs["qat_w4"]))  # the same held-out windows
    losses["QAT int8-dynact-int4"] = held_out_loss(runs["plain"], load_run(runs["qat_a8w4"]))
    return losses, runs["plain"]


def closed(losses: dict[str, float], label: str) -> float | None:
    """The share of the PTQ perplexity gap a QAT row closes (None where PTQ costs nothing)."""
    base, ptq, value = (math.exp(losses[key]) for key in ("high precision", "PTQ" + label[3:], label))
    return (ptq - value) / (ptq - base) if ptq > base else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed], plain_dir = losses_of(seed, args)
        print(f"seed {seed}: " + ", ".join(f"{label} {loss:.4f}" for label, loss in per_seed[seed].items()), flush=True)
    labels = list(per_seed[args.seeds[0]])
    mean = {label: sum(losses[label] for losses in per_seed.values()) / len(per_seed) for label in labels}
    ppl = {label: math.exp(loss) for label, loss in mean.items()}
    over = f", mean of {len(per_seed)} seeds" if len(per_seed) > 1 else ""
    print(f"\n| model (g{args.group_size}, {args.steps} steps{over}) | held-out loss | perplexity | gap to high precision "
          f"| PTQ gap closed{' (each seed)' if len(per_seed) > 1 else ''} |")
    print("|---|---|---|---|---|")
    for label, value in ppl.items():
        share = ""
        if label.startswith("QAT"):
            shares = [closed(losses, label) for losses in per_seed.values()]
            if None in shares:
                share = "(no PTQ gap)"
            else:
                share = f"{sum(shares) / len(shares):.0%}"
                share += f" ({', '.join(f'{s:.0%}' for s in shares)})" if len(shares) > 1 else ""
        print(f"| {label} | {mean[label]:.4f} | {value:.3f} | {value - ppl['high precision']:+.3f} | {share} |")
    export = plain_dir / "export"
    print(f"\nexport sizes: bf16 {_size(export / 'hf') / 2**20:.2f} MiB, W4A16 {_size(export / 'w4a16') / 2**20:.2f} MiB "
          f"({_size(export / 'w4a16') / _size(export / 'hf'):.2f}x, embeddings and norms in bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
