"""The plan as a user reads it: the best few layouts as a table, then why the first one (its memory and its
step time, part by part) and the overrides that run it."""

from trainer.planner.devices import GIB, DeviceProfile
from trainer.planner.search import Search, streams_note


def _row(i: int, r) -> str:
    c, p = r.candidate, r.prediction
    pipeline = f"{c.pp_schedule} x{c.pp_microbatches}" if c.pp > 1 else "-"
    return (f"| {i} | {c.layout()} | {c.ac} | {c.local_batch} x {c.accum_steps} | {pipeline} | "
            f"{'on' if c.float8 else 'off'} | {p.device_bytes / GIB:.1f} | {p.step_s:.3g} | {p.tokens_per_s:,.0f} | "
            f"{100 * p.mfu:.1f} |")


def plan_report(result: Search, profile: DeviceProfile, num_streams: int, *, world_size: int, nodes: int, top: int, config: str,
                elapsed_s: float) -> str:
    lines = [f"# layout plan: {world_size} rank(s) on {nodes} node(s) of {profile.name} ({profile.source})",
             f"{result.considered} candidates considered; the memory of the fastest {result.sized} estimated, "
             f"{len(result.ranked)} of them fit {result.usable_bytes / GIB:.1f} GiB per rank; {elapsed_s:.1f} s"]
    for reason, count in result.rejected.most_common():
        lines.append(f"  dropped {count}: {reason}")
    if not result.ranked:
        lines.append("nothing fits: add ranks (--world-size), shorten training.seq_len, or use adapters or a 4-bit base")
        return "\n".join(lines)
    lines += ["", "| # | layout | AC | local batch x accumulation | pipeline | float8 | GiB per rank | step s | "
              "tokens/s per device | MFU % |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(i + 1, r) for i, r in enumerate(result.ranked[:top])]
    best = result.ranked[0]
    p = best.prediction
    lines += ["", "## why the first: memory per rank (the dry run's estimate)"]
    width = max(map(len, p.memory))
    lines += [f"  {k:<{width}}  {v / GIB:9.2f} GiB" for k, v in p.memory.items() if v]
    lines += ["", "## its step, by part (predicted)"]
    width = max(map(len, p.seconds))
    lines += [f"  {k:<{width}}  {v:9.4f} s ({100 * v / p.step_s:4.1f}%)" for k, v in p.seconds.items() if v > 0]
    note = streams_note(num_streams, best)
    lines += ["", "## run it", f"  torchrun ... train.py --config {config} " + " ".join(best.overrides())]
    if note:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
