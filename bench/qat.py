"""What 4-bit weights cost a trained model, and how much of it QAT wins back: one base model finetuned three
times on the same data (plainly, with QAT int4_weight_only, with QAT int8_dynact_int4_weight), then the
held-out perplexity of each in high precision and rounded.

python -m bench.qat --base PATH --tokenizer PATH|byte --data PATH [--steps 300] [--group-size 32] [--out DIR] [KEY=VALUE ...]

Rows: the plain finetune in high precision; rounded after training (post-training quantization, PTQ) to W4A16
and to int8-dynact-int4; the QAT finetunes, rounded as they trained. Each quantized row is held against the
plain one: its perplexity gap, and for QAT the share of the PTQ gap it closes. Also the bytes of the plain run's
bf16 export against its W4A16 export. KEY=VALUE overrides go to every finetune (e.g. optimizer.lr=1e-4).
Every number is a forward of the final weights over the same held-out windows (trainer/evaluate.py).
"""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

from trainer.cli import Parser, at_least, run_command

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
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-qat"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every finetune")
    return parser.parse_args(argv)


def finetune(name: str, args) -> Path:
    out = args.out / name
    command = [sys.executable, "train.py", "--config", "configs/debug.yaml", "model.flavor=null", f"model.init_from={args.base}",
               *(["tokenizer.kind=byte"] if args.tokenizer == "byte" else ["tokenizer.kind=auto", f"tokenizer.path={args.tokenizer}"]),
               f"data.source={args.data}",
               # A text file is one document: hold out paragraphs (the stdlib's documents are its files).
               *([] if args.data == "stdlib" else ["data.text_sample_by=paragraph"]),
               f"training.steps={args.steps}", f"checkpoint.interval={args.steps}", "eval.every=0", "eval.split_fraction=0.05",
               "eval.steps=8", f"qat.group_size={args.group_size}", "export.hf=true", "export.quantized=[w4a16]",
               "metrics.progress=off", f"job.output_dir={out}", *RUNS[name], *args.overrides]
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"bench.qat: the {name} finetune failed (its output is above)")
    return out


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main(argv: list[str]) -> int:
    from trainer.build import load_run
    from trainer.config import load_config
    from trainer.evaluate import held_out_loss
    from trainer.qat.export import quantized_model
    from trainer.qat.schemes import SCHEMES

    args = parse_args(argv)
    runs = {name: finetune(name, args) for name in RUNS}
    plain = load_run(runs["plain"])
    qat = load_config(runs["plain"] / "config.yaml").qat
    losses = {"high precision": held_out_loss(runs["plain"], plain)}
    for label, scheme in (("PTQ W4A16", "int4_weight_only"), ("PTQ int8-dynact-int4", "int8_dynact_int4_weight")):
        losses[label] = held_out_loss(runs["plain"], quantized_model(plain, SCHEMES[scheme], dataclasses.replace(qat)))
    losses["QAT W4A16"] = held_out_loss(runs["plain"], load_run(runs["qat_w4"]))  # the same held-out windows
    losses["QAT int8-dynact-int4"] = held_out_loss(runs["plain"], load_run(runs["qat_a8w4"]))
    ppl = {label: math.exp(loss) for label, loss in losses.items()}
    base = ppl["high precision"]
    print(f"\n| model (g{args.group_size}, {args.steps} steps) | held-out loss | perplexity | gap to high precision | PTQ gap closed |")
    print("|---|---|---|---|---|")
    for label, value in ppl.items():
        closed = ""
        if label.startswith("QAT"):
            ptq = ppl["PTQ" + label[3:]]
            closed = f"{(ptq - value) / (ptq - base):.0%}" if ptq > base else "(no PTQ gap)"
        print(f"| {label} | {losses[label]:.4f} | {value:.3f} | {value - base:+.3f} | {closed} |")
    export = runs["plain"] / "export"
    print(f"\nexport sizes: bf16 {_size(export / 'hf') / 2**20:.2f} MiB, W4A16 {_size(export / 'w4a16') / 2**20:.2f} MiB "
          f"({_size(export / 'w4a16') / _size(export / 'hf'):.2f}x, embeddings and norms in bf16)")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
