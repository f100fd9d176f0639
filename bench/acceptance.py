"""GPU acceptance in one command: every CUDA-only path checked (tests/gpu) and every GPU target measured
(the benchmark presets that fit one GPU), in a fixed time budget, into one table.

    bash scripts/gpu_acceptance.sh [--dry] [--budget SECONDS] [--only STEP,...] [--out DIR]

Each step is a command with a timeout of its own; a step that fails or runs out of time is reported and the
next one starts. A step whose timeout would overrun the budget is shortened to what is left, and one that
would get under a minute is not started (reported as such). --dry prints the plan, then builds the table
from made-up outputs of every step (the readers and the table run, nothing is measured): the test suite
runs it on CPU so that this script cannot rot between GPU loans.

Writes DIR/acceptance.md and DIR/acceptance.json: date, GPU, torch version, and per step what passed, the
figures (tokens/s, MFU, peak memory, the dry-run estimate's error) and each against its target.
"""

import datetime
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.cli import Parser, at_least, run_command
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    name: str
    value: float | str
    target: str = ""  # e.g. ">= 1.3x"; empty: recorded, no target
    met: bool | None = None


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    timeout: int  # seconds
    args: list[str]  # after `python -m`; {out} is the step's own output directory
    read: Callable[[Path], list[Figure]]


def _bench_json(out: Path) -> dict:
    return json.loads((out / "bench.json").read_text())["results"]


def _summary(entry: dict) -> dict:
    return entry["runs"][0]["summary"]


def _estimate(entry: dict, summary: dict) -> Figure:
    """The dry-run estimate against what tensors held at most (max_memory_allocated): within 10%."""
    estimate, held = entry.get("dry_run_gib"), summary.get("peak_allocated_gib")
    if not estimate or not held:
        return Figure("dry-run estimate error", "no figure")
    error = 100 * (estimate - held) / held
    return Figure("dry-run estimate error", f"{error:+.1f}% ({estimate:.2f} GiB vs {held:.2f} allocated)", "within 10%",
                  abs(error) <= 10)


def read_tests(out: Path) -> list[Figure]:
    figures = []
    for case in ElementTree.parse(out / "junit.xml").getroot().iter("testcase"):
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            figures.append(Figure(name, f"failed: {(failed.get('message') or '')[:150]}", "passes", False))
        elif skipped is not None:
            figures.append(Figure(name, f"skipped: {(skipped.get('message') or '')[:150]}", "passes", None))
        else:
            figures.append(Figure(name, f"passed in {float(case.get('time', 0)):.1f} s", "passes", True))
    return figures


def read_comparison(out: Path) -> list[Figure]:
    """Ours (and theirs, where the preset has them) from `python -m bench --preset P`."""
    figures = []
    for key, entry in _bench_json(out).items():
        if not entry["runs"]:
            figures.append(Figure(f"{key} tokens/s", f"failed: {entry['errors'][0]}", "runs", False))
            continue
        s = _summary(entry)
        figures.append(Figure(f"{key} tokens/s", round(s["tokens_per_sec"])))
        if entry["side"] == "ours":
            mfu_target = ">= 45%" if "8b" in out.name and "qlora" not in out.name else ""
            figures.append(Figure(f"{key} MFU %", round(s["mfu"], 1), mfu_target, s["mfu"] >= 45 if mfu_target else None))
            memory_target = "<= 7 GiB" if "qlora" in out.name else ""
            peak = s.get("peak_allocated_gib") or s["peak_gib"]
            figures.append(Figure(f"{key} peak memory GiB", round(peak, 2), memory_target, peak <= 7 if memory_target else None))
            figures.append(_estimate(entry, s))
            theirs = _bench_json(out).get(f"{entry['method']}/theirs")
            if theirs and theirs["runs"]:
                ratio = s["tokens_per_sec"] / _summary(theirs)["tokens_per_sec"]
                target = ">= 1.5x" if "lora" in entry["method"] else ""
                figures.append(Figure(f"{entry['method']} ours / transformers", f"{ratio:.2f}x", target,
                                      ratio >= 1.5 if target else None))
    return figures


def read_float8(out: Path) -> list[Figure]:
    """The float8 rows of `python -m bench --variants float8` against high precision + compile."""
    results = _bench_json(out)
    reference = next((e for e in results.values() if "high precision + compile" in e["label"]), None)
    figures = []
    for key, entry in results.items():
        if not entry["runs"]:
            figures.append(Figure(f"{entry['label']} tokens/s", f"failed: {entry['errors'][0]}", "runs", False))
            continue
        s = _summary(entry)
        figures.append(Figure(f"{entry['label']} tokens/s", round(s["tokens_per_sec"])))
        figures.append(Figure(f"{entry['label']} MFU % (mixed)", f"{s['mfu']:.1f} ({s.get('mfu_mixed', s['mfu']):.1f})"))
        figures.append(_estimate(entry, s))
        if entry is not reference and reference and reference["runs"]:
            ratio = s["tokens_per_sec"] / _summary(reference)["tokens_per_sec"]
            figures.append(Figure(f"{entry['label']} / high precision + compile", f"{ratio:.2f}x", ">= 1.3x", ratio >= 1.3))
    return figures


def read_variants(out: Path) -> list[Figure]:
    """Tokens/s and peak memory of each variant row, and each row against the group's first."""
    results = _bench_json(out)
    reference = next(iter(results.values()), None)
    figures = []
    for entry in results.values():
        if not entry["runs"]:
            figures.append(Figure(f"{entry['label']} tokens/s", f"failed: {entry['errors'][0]}", "runs", False))
            continue
        s = _summary(entry)
        figures.append(Figure(f"{entry['label']} tokens/s", round(s["tokens_per_sec"])))
        peak = s.get("peak_allocated_gib") or s["peak_gib"]
        figures.append(Figure(f"{entry['label']} peak memory GiB", round(peak, 2)))
        if entry is not reference and reference["runs"]:
            ratio = s["tokens_per_sec"] / _summary(reference)["tokens_per_sec"]
            figures.append(Figure(f"{entry['label']} / {reference['label']}", f"{ratio:.2f}x"))
    return figures


def read_planner(out: Path) -> list[Figure]:
    """`python -m bench.planner --gpu`: the planner's predicted device memory against max allocated, per row."""
    rows = json.loads((out / "planner.json").read_text())["rows"]
    figures = []
    for label, r in rows.items():
        if "error" in r:
            figures.append(Figure(f"{label} memory", f"failed: {r['error']}", "within 10%", False))
        else:
            figures.append(Figure(f"{label} memory", f"{r['error_pct']:+.1f}% ({r['predicted_gib']:.2f} GiB predicted, "
                                  f"{r['measured_gib']:.2f} allocated)", "within 10%", abs(r["error_pct"]) <= 10))
    return figures


def _bench(preset: str, *extra: str) -> list[str]:
    return ["bench", "--preset", preset, "--pairs", "1", "--no-memory-runs", "--out", "{out}", *extra]


STEPS = [
    Step("gpu-tests", "tests/gpu: one test per CUDA-only path", 260,
         ["pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/gpu", "--junitxml", "{out}/junit.xml"], read_tests),
    Step("1b-bf16", "Llama 3.2 1B shape, bf16 + compile + full AC, seq 8192: ours and the transformers loop", 240,
         _bench("llama3_2_1b", "--methods", "full", "--steps", "10", "--warmup", "4"), read_comparison),
    Step("1b-float8", "Llama 3.2 1B shape, selective AC: float8 tensorwise + compile against bf16 + compile", 200,
         _bench("llama3_2_1b", "--variants", "float8", "--rows", "1,2", "--steps", "10", "--warmup", "4"), read_float8),
    Step("8b-qlora", "Llama 3.1 8B QLoRA (torchao NF4), seq 2048 x 2, bf16 + compile + full AC: ours", 200,
         _bench("8b-qlora-nf4", "--steps", "8", "--warmup", "3"), read_comparison),
    Step("8b-bf16", "Llama 3.1 8B full finetune, seq 8192, bf16 + compile + full AC: ours", 240,
         _bench("8b-seeded", "--steps", "6", "--warmup", "3"), read_comparison),
    Step("30b-a3b-moe", "Qwen3-30B-A3B's layers (8 of 48: 128 experts, 8 per token), seq 4096, bf16 + compile + full "
         "AC, one GPU: ours, MFU of the active parameters", 200, _bench("moe-30b-a3b-8l", "--steps", "8", "--warmup", "3"),
         read_comparison),
    Step("1b-8k-attention", "Llama 3.2 1B, seq 8192, bf16 + compile + full AC: document attention (FlexAttention) "
         "against causal SDPA", 200, _bench("1b-seeded", "--variants", "attention", "--steps", "8", "--warmup", "3"),
         read_variants),
    Step("1b-32k-attention", "Llama 3.2 1B, seq 32768, bf16 + compile + full AC: document attention (FlexAttention) "
         "against causal SDPA", 240, _bench("1b-32k", "--variants", "attention", "--steps", "5", "--warmup", "2"),
         read_variants),
    Step("planner-memory", "the layout planner's peak memory against max allocated: Llama 3.2 1B, seq 4096, bf16, "
         "AC none / selective_op / selective_layer / full x batch 1-4 on one GPU", 200,
         ["bench.planner", "--gpu", "--out", "{out}/planner.json"], read_planner),
]
MIN_STEP_SECONDS = 60


@dataclass
class Outcome:
    step: Step
    status: str  # passed, missed a target, failed, timed out, not run
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)


def run_step(step: Step, out: Path, timeout: float) -> Outcome:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", *(a.replace("{out}", str(out)) for a in step.args)]
    start = time.monotonic()
    with open(out / "log.txt", "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.monotonic() - start
    try:
        figures = step.read(out)
    except Exception as e:  # a step that died early leaves nothing to read: say so, keep going
        figures = [Figure("outputs", f"unreadable ({type(e).__name__}: {e})"[:200], "", False)]
    if code is None:
        status = "timed out"
    elif code != 0:
        status = "failed"
    else:  # it ran: a figure short of its target is not a crash, and the table says so apart
        status = "passed" if all(f.met is not False for f in figures) else "missed a target"
    return Outcome(step, status, seconds, figures)


def fake_outputs(step: Step, out: Path) -> None:
    """What each step would leave behind, made up, so that --dry runs the readers and the table."""
    out.mkdir(parents=True, exist_ok=True)
    if step.read is read_tests:
        (out / "junit.xml").write_text(
            '<testsuites><testsuite><testcase classname="tests.gpu.test_cuda_paths" name="test_nccl" time="3.2"/>'
            '<testcase classname="tests.gpu.test_cuda_paths" name="test_hqq" time="0.1"><skipped message="no hqq"/></testcase>'
            '</testsuite></testsuites>')
        return
    if step.read is read_planner:
        (out / "planner.json").write_text(json.dumps({"profile": "h200", "rows": {
            "AC full, batch 2": {"predicted_gib": 20.5, "measured_gib": 20.0, "error_pct": 2.5}}}))
        return
    run = {"runs": [{"summary": {"tokens_per_sec": 1000.0, "mfu": 40.0, "mfu_mixed": 30.0, "peak_gib": 8.0,
                                  "peak_allocated_gib": 6.0}}], "errors": [], "dry_run_gib": 6.3}
    if step.read is read_variants:
        results = {"attention/causal": {**run, "label": "causal"}, "attention/document": {**run, "label": "document"}}
    elif step.read is read_float8:
        results = {"float8/high precision + compile": {**run, "label": "high precision + compile"},
                   "float8/float8 tensorwise": {**run, "label": "float8 tensorwise + compile"}}
    else:
        results = {"full/ours": {**run, "method": "full", "side": "ours"},
                   "full/theirs": {**run, "method": "full", "side": "theirs"}}
    (out / "bench.json").write_text(json.dumps({"results": results}))


def table(header: dict, outcomes: list[Outcome]) -> str:
    lines = [f"# GPU acceptance, {header['date']}", "", f"{header['gpu']} | torch {header['torch']} | budget "
             f"{header['budget_s']} s | `{header['command']}`", "",
             "| step | status | seconds | figure | value | target | met |", "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        first = f"| {o.step.name} | {o.status} | {o.seconds:.0f} |"
        if not o.figures:
            lines.append(f"{first} | | | | |")
        for i, f in enumerate(o.figures):
            met = {True: "yes", False: "NO", None: ""}[f.met]
            lines.append(f"{first if i == 0 else '| | | |'} {f.name} | {f.value} | {f.target} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="bash scripts/gpu_acceptance.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="print the plan and build the table from made-up outputs")
    parser.add_argument("--budget", type=at_least(1), default=540, help="seconds for all the steps (default 540: 9 minutes)")
    parser.add_argument("--only", help=f"comma-separated steps, of: {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--out", default="outputs/gpu-acceptance")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else [s.name for s in STEPS]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown steps {', '.join(unknown)} (the steps: {', '.join(s.name for s in STEPS)})")
    import torch

    steps = [s for s in STEPS if s.name in names]
    out = Path(args.out)
    header = {"date": str(datetime.date.today()), "budget_s": args.budget, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)",
              "command": "bash scripts/gpu_acceptance.sh " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"plan ({'dry: nothing runs' if args.dry else 'running'}), budget {args.budget} s:", flush=True)
    for s in steps:
        print(f"  {s.name:<10} {s.timeout:>4} s  {s.what}\n             python -m {' '.join(s.args)}", flush=True)
    if not args.dry and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here; --dry shows the plan without one")
    start, outcomes = time.monotonic(), []
    for s in steps:
        left = args.budget - (time.monotonic() - start)
        if args.dry:
            fake_outputs(s, out / s.name)
            outcomes.append(Outcome(s, "dry", 0.0, s.read(out / s.name)))
        elif left < MIN_STEP_SECONDS:
            outcomes.append(Outcome(s, f"not run: {left:.0f} s of the budget left"))
        else:
            outcomes.append(run_step(s, out / s.name, min(s.timeout, left)))
            print(f"{s.name}: {outcomes[-1].status} in {outcomes[-1].seconds:.0f} s", flush=True)
    text = table(header, outcomes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "acceptance.md").write_text(text + "\n")
    record = [{"step": o.step.name, "status": o.status, "seconds": round(o.seconds, 1),
               "figures": [vars(f) for f in o.figures]} for o in outcomes]
    (out / "acceptance.json").write_text(json.dumps({**header, "steps": record}, indent=1))
    print(text)
    return 0 if args.dry or all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
