"""Our trainer alone at one preset's shape, one setting changed per row: what precision, compile,
activation checkpointing, a parallel layout, float8 or an asynchronous checkpoint costs or buys.

Groups of rows (`python -m bench --preset P --variants GROUP[,GROUP...]`); within a group the first row
is the reference that the others are divided by (float8: high precision + compile, as torchtitan compares), and rows run round-robin --pairs times so that a busy
machine slows every row alike.
"""

import statistics

import torch

# group -> [(label, ranks (0: --nproc), overrides)]
GROUPS = {
    "precision": [("float32", 0, ["training.mixed_precision_param=float32"]),
                  ("bfloat16", 0, ["training.mixed_precision_param=bfloat16"])],
    "compile": [("eager", 0, ["compile.enabled=false"]), ("compile", 0, ["compile.enabled=true"])],
    "ac": [(f"AC {mode}", 0, [f"activation_checkpoint.mode={mode}"])
           for mode in ("none", "selective_op", "selective_layer", "full")],
    "layouts": [("1 process", 1, []), ("dp_shard=2 (FSDP2)", 2, []), ("tp=2", 2, ["parallel.tp=2"]),
                ("pp=2 1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"])],
    # As torchtitan measures float8: selective op checkpointing, compared with high precision + compile.
    "float8": [("high precision, eager", 0, ["fp8.enabled=false", "compile.enabled=false"]),
               ("high precision + compile", 0, ["fp8.enabled=false", "compile.enabled=true"]),
               ("float8 tensorwise + float8 all-gather + compile", 0,
                ["fp8.enabled=true", "fp8.recipe=tensorwise", "fp8.fsdp_float8_all_gather=true", "compile.enabled=true"]),
               ("float8 rowwise + compile", 0, ["fp8.enabled=true", "fp8.recipe=rowwise", "compile.enabled=true"])],
    # Packed documents kept apart (FlexAttention when compiled on CUDA, SDPA's mask elsewhere) against causal.
    "attention": [("causal", 0, ["data.attention=causal"]), ("document", 0, ["data.attention=document"])],
    # Where AdamW keeps its moments (the quantized ones with their step compiled, as on a GPU).
    "optimizer": [("adamw (fp32 moments)", 0, ["optimizer.name=adamw"]),
                  ("adamw_bf16", 0, ["optimizer.name=adamw_bf16"]),
                  ("adamw_8bit", 0, ["optimizer.name=adamw_8bit", "optimizer.compile_step=always"]),
                  ("adamw_4bit", 0, ["optimizer.name=adamw_4bit", "optimizer.compile_step=always"]),
                  ("adamw, state and step on the host", 0, ["optimizer.offload=cpu"])],
    # What moves to host memory: saved activations (with and without checkpointing).
    "offload": [("nothing offloaded", 0, []),
                ("activations offloaded", 0, ["activation_checkpoint.offload=true"]),
                ("AC full", 0, ["activation_checkpoint.mode=full"]),
                ("AC full + activations offloaded", 0, ["activation_checkpoint.mode=full",
                                                        "activation_checkpoint.offload=true"])],
    "checkpoint": [("synchronous save", 0, ["checkpoint.async_save=false"]),
                   ("asynchronous save", 0, ["checkpoint.async_save=true"])],
}
# Groups whose rows are about memory: on CPU each row also gets a live-peak run (freed memory returned at
# once, as the comparison's) beside its --dry-run estimate.
LIVE_PEAK = {"optimizer", "offload"}
# The row each group's ratios are against, by label (the group's first row where not named, or not run).
REFERENCE = {"float8": "high precision + compile"}
# Every checkpoint row saves every 2 steps into its own temporary run directory.
CHECKPOINT = ["checkpoint.enabled=true", "checkpoint.interval=2", "checkpoint.keep_last=1"]


def rows(groups: list[str], *, nproc: int, no_compile: bool) -> list[tuple[str, str, int, list[str]]]:
    """(group, label, ranks, overrides) of each row; --no-compile runs compiled rows eagerly (CPU smoke runs)."""
    out = []
    for group in groups:
        for label, ranks, overrides in GROUPS[group]:
            extra = list(overrides)
            if group == "float8":
                extra.append("activation_checkpoint.mode=selective_op")
                if not torch.cuda.is_available():
                    extra.append("fp8.emulate=true")  # CPU: float8-rounded operands, fp32 matmuls
            if group == "checkpoint":
                extra = CHECKPOINT + extra
            if no_compile and "compile.enabled=true" in extra:
                extra = [o for o in extra if o != "compile.enabled=true"] + ["compile.enabled=false"]
                label += " (eager: --no-compile)"
            out.append((group, label, ranks or nproc, extra))
    return out


def _median(runs: list[dict], key: str) -> float | None:
    values = [r["summary"][key] for r in runs if r["summary"].get(key) is not None]
    return statistics.median(values) if values else None


def table(results: dict) -> str:
    """One table per group: speed, MFU, memory, the ratio to the group's first row; float8 and checkpoint
    columns where the group has them."""
    lines = []
    for group in dict.fromkeys(entry["group"] for entry in results.values()):
        entries = [e for e in results.values() if e["group"] == group]
        reference = next((e for e in entries if e["label"].startswith(REFERENCE.get(group, "\0"))), entries[0])
        extra = {"float8": " float8 FLOP share | MFU % (mixed peak) |",
                 "checkpoint": " checkpoint (MiB) | training blocked (s) | written in (s) |"}.get(group, "")
        if group in LIVE_PEAK:
            extra = " live peak (GiB) | dry-run estimate |"
        lines += ["", f"Variants: {group} (ratio = tokens/s per device over that of '{reference['label']}', per round: "
                  "median [min - max])", "",
                  "| row | ranks | tokens/s per device | step ms: median [min - max] | MFU % | peak as run (GiB) | ratio |" + extra,
                  "|---|---|---|---|---|---|---|" + "---|" * extra.count("|")]
        for entry in entries:
            runs = entry["runs"]
            if not runs:
                lines.append(f"| {entry['label']} | {entry['ranks']} | failed: {entry['errors'][0]} |")
                continue
            ratios = [a["summary"]["tokens_per_sec"] / b["summary"]["tokens_per_sec"] for a, b in zip(runs, reference["runs"])]
            ratio = f"{statistics.median(ratios):.2f}x [{min(ratios):.2f} - {max(ratios):.2f}]" if ratios else "-"
            low = min(r["summary"]["step_min_ms"] for r in runs)
            high = max(r["summary"]["step_max_ms"] for r in runs)
            cells = [entry["label"], str(entry["ranks"]), f"{_median(runs, 'tokens_per_sec'):,.0f}",
                     f"{_median(runs, 'step_ms'):.1f} [{low:.1f} - {high:.1f}]", f"{_median(runs, 'mfu'):.1f}",
                     f"{max(r['summary']['peak_gib'] for r in runs):.2f}", ratio]
            if group == "float8":
                share, mixed = _median(runs, "float8_share"), _median(runs, "mfu_mixed")
                cells += [f"{100 * share:.1f} %" if share is not None else "-", f"{mixed:.1f}" if mixed is not None else "-"]
            if group in LIVE_PEAK:
                live, estimate = entry.get("live_peak_gib"), entry.get("dry_run_gib")
                cells += [f"{live:.2f}" if live else "-",
                          f"{estimate:.2f} GiB ({100 * (estimate - live) / live:+.0f}%)" if live and estimate else "-"]
            if group == "checkpoint":
                saves = [save for r in runs for save in r["saves"]]
                cells += [f"{statistics.mean(s[k] for s in saves):{fmt}}" if saves else "-"
                          for k, fmt in (("mib", ".1f"), ("blocked_s", ".3f"), ("written_s", ".3f"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
