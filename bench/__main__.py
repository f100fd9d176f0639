"""python -m bench --preset NAME [--methods full,lora] [--steps 20] [--warmup 5] [--pairs 3] [--out DIR] [--profile] [--ours "KEY=VALUE ..."]

For each method of the preset (full finetuning, LoRA, QLoRA per backend), our trainer and the plain
transformers (+ peft, + bitsandbytes) loop run alternately, --pairs times (ours, theirs, ours, theirs,
...), on one random-weight Hugging Face checkpoint of the preset's shape that both load, the same batches,
AdamW, learning rate, clipping and precision. Per run: the steps after --warmup give the step time
(median, min, max), tokens/s, MFU, and the step's phases (data, forward, backward, optimizer, other);
the ratio ours / theirs is printed with its min and max over the pairs. Peak memory: on a GPU the speed
runs' peak reserved memory; on CPU two figures, the process's peak RSS in the speed runs (what the
machine must hold, freed memory that malloc keeps included: ours keeps it on purpose, see
trainer/host_memory.py) and the live peak, from one more short run per side with freed memory returned
at once (MALLOC_MMAP_THRESHOLD_=65536, training.cpu_malloc=system: slow, hence separate runs). Our
--dry-run estimate is printed beside our live peak (on CPU with the process's own memory added: the
interpreter and the libraries, measured by importing train.py in a fresh process, 0.3 GiB).

--profile adds a run per side that profiles one step after the warm-up (torch.profiler): the top ops by
self time, ours beside theirs.

Writes DIR/bench.md (the tables), DIR/bench.json (every per-step figure) and DIR/bench.png (loss and
tokens/s over the steps, one line per run) when matplotlib is installed (`pip install -e ".[bench]"`).
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import ours, variants
from bench.presets import METHODS, PRESETS, Preset
from bench.report import describe, plot, tables
from trainer.cli import Parser, at_least, run_command

RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def write_checkpoint(p: Preset, out: Path) -> None:
    import transformers

    shape = dict(hidden_size=p.dim, num_hidden_layers=p.n_layers, num_attention_heads=p.n_heads,
                 num_key_value_heads=p.n_kv_heads, intermediate_size=p.ffn, vocab_size=p.vocab,
                 max_position_embeddings=p.seq, tie_word_embeddings=False)
    if p.experts:
        config = transformers.Qwen3MoeConfig(**shape, head_dim=p.dim // p.n_heads, num_experts=p.experts,
                                             num_experts_per_tok=p.top_k, moe_intermediate_size=p.moe_ffn,
                                             norm_topk_prob=True, router_aux_loss_coef=0.001)
        model = transformers.Qwen3MoeForCausalLM
    else:
        config, model = transformers.LlamaConfig(**shape), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model(config).to(getattr(torch, p.dtype)).save_pretrained(out)


def theirs_sides(p: Preset) -> list[tuple[str, str | None]]:
    """(side name, transformers' experts implementation) of transformers' runs: one per implementation
    compared for a mixture of experts."""
    if not p.experts:
        return [("theirs", None)]
    return [(f"theirs, {impl} experts", impl) for impl in p.theirs_experts]


def run_theirs(p: Preset, checkpoint: Path, method: str, steps: int, adamw: str, env: dict | None = None,
               profile_step: int = 0, experts: str | None = None) -> dict | str:
    cmd = [sys.executable, "-m", "bench.theirs", "--checkpoint", str(checkpoint), "--method", method, "--seq", str(p.seq),
           "--batch", str(p.batch), "--dtype", p.dtype, "--steps", str(steps), "--adamw", adamw,
           "--profile-step", str(profile_step), *(["--experts", experts] if experts else [])]
    if p.checkpointing:
        cmd.append("--checkpointing")
    result = subprocess.run(cmd, cwd=ours.REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["failed"])[-1][:160]
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(run: dict, warmup: int, tokens_per_step: int | None) -> dict:
    """Figures over the timed steps (after the warm-up). Without tokens_per_step, tokens/s is the run's
    own per-device figure (layouts where ranks share a batch)."""
    s = run["steps"]
    timed = s["step_ms"][warmup:]
    step = statistics.median(timed)
    speed = tokens_per_step / step * 1000 if tokens_per_step else statistics.median(s["tokens_per_sec"][warmup:])
    out = {"step_ms": step, "step_min_ms": min(timed), "step_max_ms": max(timed), "tokens_per_sec": speed,
           "peak_gib": run["peak_gib"], "peak_allocated_gib": run.get("peak_allocated_gib"), "steps_timed": len(timed)}
    for phase in ("data", "forward", "backward", "optimizer", "other"):
        out[f"{phase}_ms"] = statistics.median(s[f"{phase}_ms"][warmup:])
    for key in ("mfu", "mfu_mixed", "float8_share"):
        if key in s:
            out[key] = statistics.median(s[key][warmup:])
    return out


def run_variants(args, p: Preset, checkpoint: Path | None, method: str) -> dict:
    """Each variant row of the chosen groups, round-robin --pairs times."""
    results: dict[str, dict] = {}
    chosen = variants.rows(args.variants.split(","), nproc=args.nproc, no_compile=args.no_compile)
    if args.rows:  # by their index in the group: the reference and the rows compared with it
        keep = {int(i) for i in args.rows.split(",")}
        chosen = [row for row in chosen if [r for r in chosen if r[0] == row[0]].index(row) in keep]
    for round_ in range(args.pairs):
        for group, label, ranks, extra in chosen:
            run = ours.run(p, checkpoint, method, args.steps, nproc=ranks, extra=extra)
            entry = results.setdefault(f"{group}/{label}", {"group": group, "label": label, "ranks": ranks, "overrides": extra,
                                                            "runs": [], "errors": []})
            if isinstance(run, str):
                entry["errors"].append(run)
                print(f"round {round_ + 1} {group} / {label}: failed: {run}", flush=True)
                continue
            entry["runs"].append({**run, "summary": summarize(run, args.warmup, None)})
            entry.setdefault("dry_run_gib", ours.dry_run_gib(p, checkpoint, method, ranks, extra))
            print(f"round {round_ + 1} {group} / {label}: {entry['runs'][-1]['summary']['tokens_per_sec']:,.0f} tokens/s "
                  f"per device", flush=True)
    if not torch.cuda.is_available() and not args.no_memory_runs:
        for group, label, ranks, extra in chosen:
            if group in variants.LIVE_PEAK:
                memory = ours.run(p, checkpoint, method, 2, nproc=ranks, env=RETURN_FREED,
                                  extra=[*extra, "training.cpu_malloc=system"])
                if isinstance(memory, dict):
                    results[f"{group}/{label}"]["live_peak_gib"] = memory["peak_gib"]
    return results


def compare(args, p: Preset, checkpoint: Path | None, methods: list[str]) -> dict:
    """Ours and theirs per method, interleaved --pairs times; then the memory and profile runs."""
    cpu = not torch.cuda.is_available()
    tokens_per_step = p.batch * p.seq
    ours_extra = args.ours.split() if args.ours else []
    results: dict[str, dict] = {}
    for pair in range(args.pairs):  # interleaved: ours, theirs, ours, theirs, ...
        for method in methods:
            sides = [("ours", lambda m=method: ours.run(p, checkpoint, m, args.steps, extra=ours_extra))]
            if METHODS[method][1] and checkpoint is not None:
                sides += [(side, lambda m=method, e=impl: run_theirs(p, checkpoint, METHODS[m][1], args.steps,
                                                                     args.theirs_adamw, experts=e))
                          for side, impl in theirs_sides(p)]
            for side, go in sides:
                run = go()
                entry = results.setdefault(f"{method}/{side}", {"method": method, "side": side, "runs": [], "errors": []})
                if isinstance(run, str):
                    entry["errors"].append(run)
                    print(f"pair {pair + 1} {method} {side}: failed: {run}", flush=True)
                    continue
                entry["runs"].append({**run, "summary": summarize(run, args.warmup, tokens_per_step)})
                print(f"pair {pair + 1} {method} {side}: {entry['runs'][-1]['summary']['tokens_per_sec']:,.0f} tokens/s",
                      flush=True)
    for method in methods:
        mine = results.get(f"{method}/ours")
        if mine and mine["runs"]:
            mine["dry_run_gib"] = ours.dry_run_gib(p, checkpoint, method, extra=ours_extra)
        if cpu and not args.no_memory_runs:  # the live peak: freed memory returned (ours: our retain off)
            memory = ours.run(p, checkpoint, method, 2, env=RETURN_FREED, extra=[*ours_extra, "training.cpu_malloc=system"])
            if mine and isinstance(memory, dict):
                mine["live_peak_gib"] = memory["peak_gib"]
            for side, impl in theirs_sides(p):
                theirs_entry = results.get(f"{method}/{side}")
                if theirs_entry:
                    memory = run_theirs(p, checkpoint, METHODS[method][1], 2, args.theirs_adamw, env=RETURN_FREED,
                                        experts=impl)
                    if isinstance(memory, dict):
                        theirs_entry["live_peak_gib"] = memory["peak_gib"]
        if args.profile:  # separate runs: the profiler slows the step it watches
            step = args.warmup + 1
            side, impl = theirs_sides(p)[0]
            for entry, go in ((mine, lambda: ours.run(p, checkpoint, method, step, extra=ours_extra, profile_step=step)),
                              (results.get(f"{method}/{side}"),
                               lambda: run_theirs(p, checkpoint, METHODS[method][1], step, args.theirs_adamw,
                                                  profile_step=step, experts=impl))):
                if entry and entry["runs"]:
                    run = go()
                    entry["ops"] = run["ops"] if isinstance(run, dict) else []
    return results


def parse_args(argv: list[str]):
    """The command line, checked (the docs test parses every documented bench command with it)."""
    parser = Parser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu-small")
    parser.add_argument("--methods", help=f"comma-separated, of: {', '.join(METHODS)} (default: the preset's)")
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--pairs", type=at_least(1), default=3)
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--no-memory-runs", action="store_true", help="CPU: skip the separate peak-memory runs")
    parser.add_argument("--theirs-adamw", choices=("default", "foreach", "fused"), default="default",
                        help="their AdamW: torch's default for the device (what a plain loop gets; the for-loop on CPU), "
                             "or foreach / fused (transformers' Trainer's default)")
    parser.add_argument("--ours", help="overrides for our runs of the comparison, space-separated in one argument "
                                       "(e.g. \"optimizer.name=adamw_8bit\")")
    parser.add_argument("--variants", help=f"instead of the comparison, our rows of: {', '.join(variants.GROUPS)} "
                                           "(comma-separated), one setting changed per row")
    parser.add_argument("--nproc", type=at_least(1), default=max(1, torch.cuda.device_count()),
                        help="ranks of the variant rows (layouts set their own)")
    parser.add_argument("--no-compile", action="store_true", help="variant rows: run the compiled ones eagerly")
    parser.add_argument("--rows", help="variant rows to run, by index in their group (e.g. 1,2; default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="one more run per side that profiles the step after the warm-up: top ops side by side")
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]
    methods = args.methods.split(",") if args.methods else list(p.methods)
    unknown = [m for m in methods if m not in METHODS] + [
        g for g in (args.variants.split(",") if args.variants else []) if g not in variants.GROUPS]
    if unknown:
        parser.error(f"unknown methods or variant groups {', '.join(unknown)} (methods: {', '.join(METHODS)}; "
                     f"variant groups: {', '.join(variants.GROUPS)})")
    if args.warmup >= args.steps:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup} (the warm-up steps are not timed)")
    return args


def main(argv: list[str] | None = None) -> int:
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()
    args = parse_args(argv if argv is not None else sys.argv[1:])
    p = PRESETS[args.preset]
    methods = args.methods.split(",") if args.methods else list(p.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    header = (f"{datetime.date.today()} | {platform.node()} | {device} | torch {torch.__version__} | python -m bench "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None if p.flavor else Path(tmp) / "hf"
        if checkpoint is not None:
            write_checkpoint(p, checkpoint)
        if args.variants:
            results = run_variants(args, p, checkpoint, methods[0])
            text = "\n".join([f"# Benchmark: {args.preset}, variants", "", header, "", describe(p, args), variants.table(results)])
            return finish(out, header, args, results, text)
        results = compare(args, p, checkpoint, methods)
    return finish(out, header, args, results, tables(header, p, args, results))


def finish(out: Path, header: str, args, results: dict, text: str) -> int:
    """Prints the tables and writes them, the per-step figures and the plot under --out."""
    print(text)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"header": header, "preset": args.preset, "results": results}, indent=1))
    if plot(results, out / "bench.png"):
        print(f"wrote {out / 'bench.md'}, {out / 'bench.json'} and {out / 'bench.png'}")
    else:
        print(f"wrote {out / 'bench.md'} and {out / 'bench.json'} (no plot: pip install -e \".[bench]\")")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
