"""train.py's `--plan` and `--calibrate`."""

import time
from pathlib import Path

import torch

from trainer.config import ConfigError
from trainer.config.schema import ParallelConfig
from trainer.planner.devices import DATASHEETS, DeviceProfile, load_profile


def this_gpu_profile() -> DeviceProfile | None:
    """The datasheet of this machine's GPU, by its name (None: no GPU, or one without a datasheet here)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l40s"):
        if key in name:
            return next(p for k, p in DATASHEETS.items() if k.startswith(key))
    return None


def resolve_profile(device: str | None) -> DeviceProfile:
    """--device: a datasheet name, a calibrated profile file, `cpu` (this machine measured now), or nothing
    (this machine's GPU by name, else its CPU measured now)."""
    if device is None:
        device = "gpu" if this_gpu_profile() else "cpu"
        if device == "gpu":
            return this_gpu_profile()
    if device == "cpu":
        if torch.cuda.is_available():
            raise ConfigError("--device cpu measures this machine's CPU; this one has a GPU: name the GPU's profile")
        from trainer.planner.calibrate import calibrate

        return calibrate("cpu (measured now)")
    return load_profile(device)


def plan_command(result, profile: DeviceProfile, args, num_streams: int, elapsed_s: float) -> str:
    """--plan's report of a search (train.py runs the search: it holds the config)."""
    from trainer.planner.report import plan_report

    return plan_report(result, profile, num_streams, world_size=args.world_size or 1, nodes=args.nodes, top=args.top,
                       config=args.config, elapsed_s=elapsed_s)


def calibrate_command(path: str) -> str:
    from trainer.planner.calibrate import calibrate

    out = Path(path)
    if not out.parent.is_dir():
        raise ConfigError(f"--profile-out {path}: the folder {out.parent} does not exist")
    start = time.perf_counter()
    profile = calibrate()
    out.write_text(profile.to_json() + "\n")
    best = {k: max(f for _, f in v) / 1e9 for k, v in profile.matmul.items()}
    rates = ", ".join(f"{k} {v:,.0f}" for k, v in best.items())
    links = ", ".join(f"{k} {v.bus_bytes_per_s / 1e9:.2f} GB/s + {v.latency_s * 1e6:.0f} us" for k, v in profile.intra.items())
    return (f"calibrated {profile.name} in {time.perf_counter() - start:.1f} s -> {out}\n"
            f"  matmul GFLOP/s (best size): {rates}\n  memory bandwidth {profile.memory_bytes_per_s / 1e9:.1f} GB/s; "
            f"compute/communication overlap {profile.overlap:.2f}; float8 matmul speed {profile.float8_speedup:.2f}x\n"
            f"  collectives: {links}\n{_wrapper_costs(profile)}  plan with it: python train.py --config X --plan --world-size N --device {out}")


def _wrapper_costs(profile: DeviceProfile) -> str:
    """The lines on what calibrate_layouts.py and reference.py measured (none for a single device)."""
    f = profile.fsdp_links
    lines = []
    if f:
        lines.append(f"  FSDP per block: gather {f['gather'].bus_bytes_per_s / 1e9:.2f} GB/s + {f['gather'].latency_s * 1e3:.1f} ms, "
                     f"reduce {f['reduce'].bus_bytes_per_s / 1e9:.2f} GB/s + {f['reduce'].latency_s * 1e3:.1f} ms; "
                     f"replicas' all-reduce {f['replicate_reduce'].bus_bytes_per_s / 1e9:.2f} GB/s + "
                     f"{f['replicate_reduce'].latency_s * 1e3:.1f} ms; a tensor-parallel block "
                     f"{profile.tp_block_s * 1e3:.1f} ms beyond its bytes")
    if profile.compute_efficiency:
        lines.append("  compute efficiency on the reference model: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in profile.compute_efficiency.items()))
    return "".join(line + "\n" for line in lines)


def auto_profile(parallel: ParallelConfig) -> DeviceProfile:
    """The profile parallel.auto=true plans with: parallel.auto_profile, else this machine's GPU's datasheet."""
    if parallel.auto_profile is not None:
        return load_profile(parallel.auto_profile)
    profile = this_gpu_profile()
    if profile is None:
        raise ConfigError("parallel.auto=true on a machine without a known GPU needs parallel.auto_profile=FILE: make one "
                          "with python train.py --calibrate --profile-out FILE (a measurement at every start could "
                          "differ between ranks, and they must choose alike)")
    return profile


def auto_choice(result, profile: DeviceProfile, world_size: int) -> tuple[list[str], str]:
    """parallel.auto=true: the overrides of the search's best layout, and a line saying what it chose."""
    if not result.ranked:
        raise ConfigError(f"parallel.auto=true: no layout of {world_size} rank(s) fits this model in "
                          f"{result.usable_bytes / 2**30:.1f} GiB per rank by the estimate; add ranks, shorten "
                          f"training.seq_len, or use adapters (python train.py --config X --plan says more)")
    best = result.ranked[0]
    chosen = best.overrides()
    c, p = best.candidate, best.prediction
    line = (f"parallel.auto: {c.layout()}, AC {c.ac}, local batch {c.local_batch} x {c.accum_steps} accumulation, float8 "
            f"{'on' if c.float8 else 'off'} (the best of {len(result.ranked)} that fit, by {profile.name}): predicted "
            f"{p.tokens_per_s:,.0f} tokens/s per device, {p.device_bytes / 2**30:.1f} GiB per rank; as overrides: "
            f"{' '.join(chosen)}")
    return [*chosen, "parallel.auto=false", "parallel.auto_profile=null"], line
