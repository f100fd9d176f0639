"""The layout planner against measurement on this machine: for each row (a layout, an activation
checkpointing mode, adapters or a 4-bit base, emulated float8), the planner's predicted per-rank peak memory
and step time beside a real run's.

python -m bench.planner [--profile FILE] [--steps 8] [--rounds 3] [--rows a,b,...] [--rank] [--out FILE.json]
python -m bench.planner --gpu [--out FILE.json]

- --profile: a device profile from `python train.py --calibrate --profile-out FILE` (default: calibrate at the
  start of every round).
- Step time: the median of a run's steps after the first two (training.cpu_malloc=retain, the default); rows run
  round-robin --rounds times, each round's predictions from that round's calibration; the medians over rounds.
- Peak memory: a second run with freed memory returned at once (training.cpu_malloc=system and glibc tunables,
  LIVE below), every rank's resident high-water mark (VmHWM, read from /proc while it runs), the largest over
  its ranks; predicted:
  the dry run's estimate for the busiest rank plus the profile's process memory (interpreter and libraries).
- --rank: the planner's search for the 2-rank job (MODEL, a global batch of 8 sequences), its first --top
  layouts run for real (--rounds times round-robin, the median), ranked by measured step time beside the
  predicted ranking, with the first round's profile.
- --gpu: on one GPU, GPU_ROWS (activation checkpointing and batch varied) for memory: the planner's device
  memory, with this GPU's datasheet, against what tensors held at most (torch.cuda.max_memory_allocated, the
  trainer's memory/peak_allocated_gib); within 10% is the target. bench/acceptance.py runs it as a step.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainer.cli import Parser, run_command
from trainer.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# 33.6M parameters (dim 512, 8 layers, vocabulary 8,192), sequences of 512: training memory (about 1 GiB)
# well over the process's own, a step of a few seconds on 2 cores.
MODEL = ["--config", "configs/debug.yaml", "model.dim=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4",
         "model.ffn_hidden_dim=1536", "model.vocab_size=8192", "training.seq_len=512", "training.local_batch_size=2",
         "training.global_batch_size=4", "metrics.log_every=1", "metrics.progress=off", "checkpoint.enabled=false",
         "eval.every=0", "lr_scheduler.warmup_steps=0"]
LORA = ["adapters.kind=lora"]
ROWS = {
    "1 rank": (1, []),
    "1 rank + AC selective_op": (1, ["activation_checkpoint.mode=selective_op"]),
    "1 rank + AC selective_layer": (1, ["activation_checkpoint.mode=selective_layer"]),
    "1 rank + AC full": (1, ["activation_checkpoint.mode=full"]),
    "1 rank + LoRA": (1, LORA),
    "1 rank + QLoRA (nf4 base)": (1, [*LORA, "adapters.quantize_base=nf4"]),
    "1 rank + float8 (emulated)": (1, ["fp8.enabled=true", "fp8.emulate=true"]),
    "fsdp 2": (2, []),
    "fsdp 2 + AC full": (2, ["activation_checkpoint.mode=full"]),
    "fsdp 2 + LoRA": (2, LORA),
    "rep 2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    "tp 2": (2, ["parallel.tp=2"]),
    "pp 2 (1f1b)": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "cp 2": (2, ["parallel.cp=2"]),
}


# One GPU: Llama 3.2 1B's shape in bf16 (bench.presets' 1b-seeded, seeded init), sequences of 4096, no compile
# (its first call would take a third of the step's budget); each row a checkpointing mode and batch.
GPU_ROWS = {
    "AC none, batch 1": ["activation_checkpoint.mode=none", "training.local_batch_size=1"],
    "AC selective_op, batch 1": ["activation_checkpoint.mode=selective_op", "training.local_batch_size=1"],
    "AC selective_layer, batch 2": ["activation_checkpoint.mode=selective_layer", "training.local_batch_size=2"],
    "AC full, batch 2": ["activation_checkpoint.mode=full", "training.local_batch_size=2"],
    "AC full, batch 4": ["activation_checkpoint.mode=full", "training.local_batch_size=4"],
}
GPU_EXTRA = ["training.seq_len=4096", "compile.enabled=false"]


def gpu_memory(steps: int = 3) -> dict:
    """{row: {"predicted_gib", "measured_gib", "error_pct"} or {"error": ...}} on this machine's GPU."""
    from bench import ours
    from bench.presets import PRESETS
    from trainer.config import load_config
    from trainer.plan import make_plan
    from trainer.planner.command import this_gpu_profile
    from trainer.planner.devices import DATASHEETS
    from trainer.planner.search import predict_plan

    preset, profile = PRESETS["1b-seeded"], this_gpu_profile() or DATASHEETS["h200"]
    results = {}
    for label, rows in GPU_ROWS.items():
        extra = [*GPU_EXTRA, *rows]
        args = ours.overrides(preset, None, "full", steps, extra)
        predicted = predict_plan(make_plan(load_config(REPO / args[1], args[2:]), 1), profile).device_bytes / 2**30
        measured = ours.run(preset, None, "full", steps, extra=extra)
        if isinstance(measured, str) or not measured["peak_allocated_gib"]:
            results[label] = {"error": measured if isinstance(measured, str) else "no allocated peak (not a GPU run)"}
        else:
            held = measured["peak_allocated_gib"]
            results[label] = {"predicted_gib": predicted, "measured_gib": held, "error_pct": 100 * (predicted - held) / held}
        print(f"bench.planner: {label}: {results[label]}", file=sys.stderr, flush=True)
    return {"profile": profile.name, "rows": results}


def gpu_table(result: dict) -> str:
    lines = [f"profile: {result['profile']}", "", "| row | peak GiB: predicted | measured (max allocated) | error |",
             "|---|---|---|---|"]
    for label, r in result["rows"].items():
        lines.append(f"| {label} | failed: {r['error']} | | |" if "error" in r else
                     f"| {label} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['error_pct']:+.1f}% |")
    return "\n".join(lines)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _high_water(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# The memory runs' C library: every block over 128 KiB mapped and unmapped on its own, and the heap's free top
# returned past 128 KiB, so that resident memory follows what is allocated (glibc's default raises its mmap
# threshold to 32 MiB as blocks are freed, and the heap then keeps freed activations: a high-water mark of
# the allocator's, not of the tensors').
LIVE = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"}


def run(nproc: int, overrides: list[str], steps: int, env: dict | None = None) -> dict | str:
    """{"step_s": [...], "peak_bytes": the largest rank's VmHWM} of a run, or its error's last line."""
    with tempfile.TemporaryDirectory() as out:
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node", str(nproc)]
        cmd = [*launcher, "train.py", *MODEL, *overrides, f"training.steps={steps}", f"job.output_dir={out}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)), **(env or {})}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                peaks[pid] = max(peaks.get(pid, 0), _high_water(pid))
            time.sleep(0.2)
        stderr = proc.stderr.read()
        if proc.returncode != 0:
            return (stderr.strip().splitlines() or ["failed"])[-1][:200]
        from trainer.run_record import read_records

        records = [r for _, r in sorted(read_records(Path(out) / "metrics.jsonl", "step").items())]
        return {"step_s": [r["time/step_seconds"] for r in records], "peak_bytes": max(peaks.values(), default=0)}


def predicted(nproc: int, overrides: list[str], profile) -> dict:
    from trainer.config import load_config
    from trainer.plan import make_plan
    from trainer.planner.search import predict_plan

    p = predict_plan(make_plan(load_config(REPO / MODEL[1], [*MODEL[2:], *overrides]), nproc), profile)
    return {"step_s": p.step_s, "peak_bytes": sum(p.memory.values()) + profile.process_bytes,
            "training_bytes": sum(p.memory.values())}


def _pct(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f}%"


def table(results: dict, profile) -> str:
    lines = [f"profile: {profile.name} ({profile.source}); process memory {profile.process_bytes / 2**30:.2f} GiB per rank",
             "", "| row | ranks | step s: predicted | measured [min - max over rounds] | error | peak GiB: predicted | "
             "measured | error |", "|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "error" in r:
            lines.append(f"| {label} | {r['ranks']} | failed: {r['error']} | | | | | |")
            continue
        spread = [x["step_s"] for x in r["rounds"]]
        lines.append(f"| {label} | {r['ranks']} | {r['predicted']['step_s']:.2f} | {r['step_s']:.2f} [{min(spread):.2f} - "
                     f"{max(spread):.2f}] | {_pct(r['predicted']['step_s'], r['step_s'])} | "
                     f"{r['predicted']['peak_bytes'] / 2**30:.2f} | {r['peak_bytes'] / 2**30:.2f} | "
                     f"{_pct(r['predicted']['peak_bytes'], r['peak_bytes'])} |")
    return "\n".join(lines)


def measure_rows(labels: list[str], profile_path: str | None, steps: int, rounds: int) -> tuple[dict, list]:
    """Each row's memory run once, then `rounds` rounds of every row's timed run, each round predicted with a
    calibration taken at its start (the machine's speed drifts over minutes; a prediction and the runs it is
    held against are made in the same minutes). Step time: the median over rounds, predicted and measured."""
    from trainer.planner.calibrate import calibrate
    from trainer.planner.devices import load_profile

    results = {label: {"ranks": ROWS[label][0], "rounds": []} for label in labels}
    profiles = []
    for round_ in range(rounds):
        profile = load_profile(profile_path) if profile_path else calibrate()
        profiles.append(profile)
        for label in labels:
            nproc, overrides = ROWS[label]
            entry = results[label]
            if "error" in entry:
                continue
            timed = run(nproc, overrides, steps)
            if isinstance(timed, str):
                entry["error"] = timed
                continue
            entry["rounds"].append({"step_s": statistics.median(timed["step_s"][2:] or timed["step_s"]),
                                    "predicted": predicted(nproc, overrides, profile)})
            if round_ == 0:
                memory = run(nproc, [*overrides, "training.cpu_malloc=system"], 3, LIVE)
                if isinstance(memory, str):
                    entry["error"] = memory
                    continue
                entry["peak_bytes"] = memory["peak_bytes"]
            print(f"bench.planner: round {round_ + 1}: {label}: {entry['rounds'][-1]}", file=sys.stderr, flush=True)
    for entry in results.values():
        if "error" not in entry:
            entry["step_s"] = statistics.median(r["step_s"] for r in entry["rounds"])
            entry["predicted"] = {"step_s": statistics.median(r["predicted"]["step_s"] for r in entry["rounds"]),
                                  "peak_bytes": entry["rounds"][0]["predicted"]["peak_bytes"]}
    return results, profiles


def rank_layouts(profile, steps: int, top: int, rounds: int = 1) -> str:
    """The planner's candidates for the 2-rank job, each run `rounds` times round-robin (the machine drifts by
    a fifth over minutes; each layout's median step): the planner's order against the measured one."""
    from trainer.config import load_config
    from trainer.planner.search import search

    cfg = load_config(REPO / MODEL[1], [*MODEL[2:], "training.global_batch_size=8"])
    ranked = search(cfg, 2, profile).ranked[:top]
    measured: list[list[float]] = [[] for _ in ranked]
    errors: list[str | None] = [None for _ in ranked]
    for round_ in range(rounds):
        for i, r in enumerate(ranked):
            if errors[i]:
                continue
            result = run(2 if r.plan.dims.world_size == 2 else 1, [*r.overrides(), "training.global_batch_size=8"], steps)
            if isinstance(result, str):
                errors[i] = result
                continue
            measured[i].append(statistics.median(result["step_s"][2:]))
            print(f"bench.planner: rank round {round_ + 1}: {i + 1} {r.candidate}: predicted {r.prediction.step_s:.2f} s, "
                  f"measured {measured[i][-1]:.2f} s", file=sys.stderr, flush=True)
    rows = [(i + 1, r, statistics.median(measured[i]) if measured[i] and not errors[i] else None, errors[i])
            for i, r in enumerate(ranked)]
    done = sorted((s, i) for i, _, s, _ in rows if s is not None)
    place = {i: n + 1 for n, (_, i) in enumerate(done)}
    fastest = done[0][0] if done else float("nan")
    lines = ["| planner's rank | layout | AC | local batch x accumulation | pipeline | step s: predicted | measured | "
             "measured rank | over the fastest |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r, step, error in rows:
        c = r.candidate
        pipeline = f"{c.pp_schedule} x{c.pp_microbatches}" if c.pp > 1 else "-"
        cell = f"{step:.2f} | {place[i]} | {100 * (step / fastest - 1):+.1f}%" if step else f"failed: {error} | | "
        lines.append(f"| {i} | {c.layout()} | {c.ac} | {c.local_batch} x {c.accum_steps} | {pipeline} | "
                     f"{r.prediction.step_s:.2f} | {cell} |")
    return "\n".join(lines)


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.planner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="a device profile file (default: calibrate this machine now)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of every row, round-robin, each round calibrated")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels")
    parser.add_argument("--rank", action="store_true", help="also run the planner's candidates for the 2-rank job")
    parser.add_argument("--top", type=int, default=12, help="with --rank: how many of them")
    parser.add_argument("--gpu", action="store_true", help="instead: GPU_ROWS' memory on this machine's GPU")
    parser.add_argument("--out", type=Path, default=None, help="the results as JSON")
    args = parser.parse_args(argv)
    args.labels = [label.strip() for label in args.rows.split(",") if label.strip()]
    unknown = [label for label in args.labels if label not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; rows are {list(ROWS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu: no CUDA GPU here (the rows measure what tensors hold on one)")
        result = gpu_memory()
        print(gpu_table(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return 0
    results, profiles = measure_rows(args.labels, args.profile, args.steps, args.rounds)
    profile = profiles[0]
    print(table(results, profile))
    if args.rank:
        print()
        print(rank_layouts(profile, args.steps, args.top, args.rounds))
    if args.out:  # the measurements and the profile they were predicted with: reanalysed without running again
        args.out.write_text(json.dumps({"profiles": [json.loads(p.to_json()) for p in profiles], "rows": results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
