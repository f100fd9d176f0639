"""The benchmark's tables (markdown) and plot (PNG)."""

import statistics

PHASES = ("data", "forward", "backward", "optimizer", "other")


def _median(entry: dict, key: str) -> float:
    return statistics.median(run["summary"][key] for run in entry["runs"])


def _peak(entry: dict) -> float:
    """The peak as run: the most any speed run held (GPU: reserved memory; CPU: RSS)."""
    return max(run["summary"]["peak_gib"] for run in entry["runs"])


def _live(entry: dict) -> float:
    """The live peak (CPU: the separate run with freed memory returned at once), else the peak as run."""
    return entry.get("live_peak_gib") or _peak(entry)


def _theirs(results: dict, method: str) -> list[dict]:
    """transformers' entries of a method (one per experts implementation for a mixture of experts)."""
    return [e for e in results.values() if e["method"] == method and e["side"].startswith("theirs")]


def describe(preset, args) -> str:
    experts = (f" ({preset.experts} experts of hidden {preset.moe_ffn}, {preset.top_k} per token, in every layer)"
               if preset.experts else "")
    return (f"shape dim {preset.dim}, {preset.n_layers} layers, heads {preset.n_heads}/{preset.n_kv_heads}, ffn {preset.ffn}"
            f"{experts}, vocab {preset.vocab}; seq {preset.seq} x batch {preset.batch} per rank, {preset.dtype}; activation checkpointing "
            f"{'full' if preset.checkpointing else 'off'}, compile {'on' if preset.compile else 'off'} (unless a row says "
            f"otherwise); {args.steps} steps per run, the first {args.warmup} not timed; {args.pairs} interleaved round(s)")


def tables(header: str, preset, args, results: dict) -> str:
    lines = [f"# Benchmark: {args.preset}", "", header, "", describe(preset, args), "",
             "| method | side | tokens/s | step ms: median [min - max] | MFU % | peak as run (GiB) | live peak (GiB) | "
             "our dry-run estimate |", "|---|---|---|---|---|---|---|---|"]
    for key, entry in results.items():
        if not entry["runs"]:
            lines.append(f"| {entry['method']} | {entry['side']} | failed: {entry['errors'][0]} | | | | | |")
            continue
        step = _median(entry, "step_ms")
        low = min(r["summary"]["step_min_ms"] for r in entry["runs"])
        high = max(r["summary"]["step_max_ms"] for r in entry["runs"])
        mine = results.get(f"{entry['method']}/ours")
        if entry["side"] == "ours":
            mfu = _median(entry, "mfu")
        elif mine and mine["runs"]:  # the same FLOPs per token and the same peak: scale ours by the speed ratio
            mfu = _median(mine, "mfu") * _median(entry, "tokens_per_sec") / _median(mine, "tokens_per_sec")
        else:
            mfu = float("nan")
        estimate = entry.get("dry_run_gib")
        est = f"{estimate:.2f} GiB ({100 * (estimate - _live(entry)) / _live(entry):+.0f}%)" if estimate else "-"
        live = f"{entry['live_peak_gib']:.2f}" if entry.get("live_peak_gib") else "-"
        lines.append(f"| {entry['method']} | {entry['side']} | {_median(entry, 'tokens_per_sec'):,.0f} | "
                     f"{step:.1f} [{low:.1f} - {high:.1f}] | {mfu:.1f} | {_peak(entry):.2f} | {live} | {est} |")

    lines += ["", "Ours against theirs (tokens/s ratio per interleaved pair; peak memory ratios):", "",
              "| method | against | tokens/s ratio: median [min - max] | peak as run ratio | live peak ratio |",
              "|---|---|---|---|---|"]
    for key, entry in results.items():
        if entry["side"] != "ours" or not entry["runs"]:
            continue
        for theirs in _theirs(results, entry["method"]):
            if not theirs["runs"]:
                continue
            ratios = [a["summary"]["tokens_per_sec"] / b["summary"]["tokens_per_sec"]
                      for a, b in zip(entry["runs"], theirs["runs"])]
            lines.append(f"| {entry['method']} | {theirs['side']} | {statistics.median(ratios):.2f}x [{min(ratios):.2f} - "
                         f"{max(ratios):.2f}] | {_peak(entry) / _peak(theirs):.2f}x | {_live(entry) / _live(theirs):.2f}x |")

    lines += ["", "Where a step's time goes (medians of the timed steps, ms; other = the step minus the phases; "
              "tail = the slowest timed step over the median):", "",
              "| method | side | " + " | ".join(PHASES) + " | other % | tail |", "|---|---|" + "---|" * (len(PHASES) + 2)]
    for entry in results.values():
        if not entry["runs"]:
            continue
        phases = [_median(entry, f"{phase}_ms") for phase in PHASES]
        step = _median(entry, "step_ms")
        tail = max(r["summary"]["step_max_ms"] / r["summary"]["step_ms"] for r in entry["runs"])
        lines.append(f"| {entry['method']} | {entry['side']} | " + " | ".join(f"{v:.1f}" for v in phases) +
                     f" | {100 * phases[-1] / step:.1f} | {tail:.2f}x |")
    lines += _ops_tables(results)
    return "\n".join(lines)


def _ops_tables(results: dict, rows: int = 15) -> list[str]:
    """Per method with --profile: the ops with the most self time in one step, ours beside theirs."""
    lines = []
    for entry in results.values():
        if entry["side"] != "ours" or not entry.get("ops"):
            continue
        theirs = {op["name"]: op for op in next(iter(_theirs(results, entry["method"])), {}).get("ops", [])}
        mine = {op["name"]: op for op in entry["ops"]}
        names = sorted(set(mine) | set(theirs), key=lambda n: -max(mine.get(n, {}).get("self_ms", 0),
                                                                    theirs.get(n, {}).get("self_ms", 0)))[:rows]
        cell = lambda op: f"{op['self_ms']:.1f} ({op['calls']})" if op else "-"  # noqa: E731
        lines += ["", f"Top ops by self time in one profiled step, {entry['method']} (ms, calls in brackets; the "
                  "profiler slows the step, so these add up to more than the step times above):", "",
                  "| op | ours | theirs |", "|---|---|---|"]
        lines += [f"| {name} | {cell(mine.get(name))} | {cell(theirs.get(name))} |" for name in names]
    return lines


def plot(results: dict, path) -> bool:
    """Loss and tokens/s per step, a line per run; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (loss_axes, speed_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, entry in results.items():
        for i, run in enumerate(entry["runs"]):
            steps = range(1, len(run["steps"]["loss"]) + 1)
            label = f"{key} #{i + 1}"
            loss_axes.plot(steps, run["steps"]["loss"], label=label)
            speed_axes.plot(steps, run["steps"]["tokens_per_sec"], label=label)
    loss_axes.set(xlabel="step", ylabel="training loss", title="loss")
    speed_axes.set(xlabel="step", ylabel="tokens/s per device", title="throughput")
    speed_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
