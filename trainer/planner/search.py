"""`--plan`: every candidate layout predicted, those over the memory margin dropped, the rest ranked by
predicted tokens/s per device (ties: less memory)."""

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch

from trainer.config import Config, ConfigError
from trainer.config.schema import Float8Config, TrainingConfig
from trainer.dry_run import busiest_parts, converted_estimate
from trainer.optimizer import state_bytes
from trainer.plan import Plan, make_plan
from trainer.planner.candidates import AC_MODES, Candidate, enumerate_candidates, streams_for, variant_plan
from trainer.planner.devices import DeviceProfile
from trainer.planner.estimate import Prediction, predict, with_memory
from trainer.planner.views import ModelView, busiest_views
from trainer.precision import Precision


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    plan: Plan
    prediction: Prediction

    def overrides(self) -> list[str]:
        return self.candidate.overrides(self.plan.cfg.data.num_streams)


@dataclass(frozen=True)
class Search:
    ranked: list[Ranked]  # fitting candidates, best first (the fastest `keep` of them)
    rejected: Counter  # reason -> how many candidates
    considered: int
    sized: int  # candidates whose memory was estimated (the fastest, until `keep` fit)
    usable_bytes: float  # per rank, after the margin


def precision_on(training: TrainingConfig, profile: DeviceProfile) -> Precision:
    """The run's compute and reduce dtypes on the profile's device (auto: bfloat16 on a GPU)."""
    device = torch.device("cuda" if profile.kind == "gpu" else "cpu")
    return Precision.from_config(training.mixed_precision_param, training.mixed_precision_reduce, device)


def usable_bytes(profile: DeviceProfile, ranks_per_node: int, margin: float) -> float:
    """What one rank may plan to fill: the margin of a GPU's memory, or (CPU) of the host's shared by its
    ranks, less each rank's own process."""
    if profile.kind == "cpu":
        return margin * profile.memory_bytes / ranks_per_node - profile.process_bytes
    return margin * profile.memory_bytes


def _float8_options(fp8: Float8Config, profile: DeviceProfile) -> tuple[bool, ...]:
    if fp8.enabled:
        return (True,)
    return (False, True) if profile.float8_speedup > 1 else (False,)


def search(cfg: Config, world_size: int, profile: DeviceProfile, *, nodes: int = 1, margin: float = 0.8,
           ac_modes: tuple[str, ...] = AC_MODES, max_local_batch: int = 16, keep: int = 100) -> Search:
    if world_size % nodes:
        raise ConfigError(f"--world-size {world_size} does not split over --nodes {nodes} evenly")
    ranks_per_node = world_size // nodes
    if profile.kind == "gpu" and ranks_per_node > profile.devices_per_node:
        raise ConfigError(f"{ranks_per_node} ranks per node, and a {profile.name} node has {profile.devices_per_node} "
                          f"devices: raise --nodes")
    # The base plans: the config as it is, on one rank (every layout check runs again per candidate), with
    # float8 off and (where it may win) on. A config whose own layout does not fit world_size is still planned.
    one = dataclasses.replace(cfg.parallel, dp_replicate=1, dp_shard=1, tp=1, pp=1, cp=1, ep=1)
    bases = {}
    for float8 in _float8_options(cfg.fp8, profile):
        # Planning for GPUs elsewhere: float8's checks want this machine's GPU; its numerics emulated plan the same.
        emulate = cfg.fp8.emulate or (float8 and profile.kind == "gpu" and not torch.cuda.is_available())
        trial = dataclasses.replace(cfg, parallel=one, fp8=dataclasses.replace(cfg.fp8, enabled=float8, emulate=emulate),
                                    training=dataclasses.replace(cfg.training, global_batch_size=-1),
                                    data=dataclasses.replace(cfg.data, num_streams=1))
        try:
            plan = make_plan(trial, 1)
        except ConfigError:
            if float8 == cfg.fp8.enabled:
                raise
            continue
        bases[float8] = dataclasses.replace(plan, meta=ModelView(plan.meta))
    precision = precision_on(cfg.training, profile)
    limit = usable_bytes(profile, ranks_per_node, margin)
    max_tp = min(ranks_per_node, profile.devices_per_node)
    parts_cache: dict[tuple, list] = {}
    converted_cache: dict[tuple, tuple] = {}
    timed, rejected, considered = [], Counter(), 0
    args = next(iter(bases.values())).model_args
    # First the time of every candidate (cheap), then the memory (the dry run's estimate, the slow part) from
    # the fastest down, until `keep` fit: a slower candidate cannot rank above them.
    for c in enumerate_candidates(cfg.training, cfg.parallel, args, world_size, max_tp=max_tp, float8_options=tuple(bases), ac_modes=ac_modes,
                                  max_local_batch=max_local_batch):
        considered += 1
        try:
            plan = variant_plan(bases[c.float8], c, world_size)
        except ConfigError as e:
            rejected[str(e).split(";")[0]] += 1
            continue
        key = (c.float8, plan.dims.pp, plan.num_stages)
        if key not in parts_cache:
            parts_cache[key] = busiest_views(plan.family, plan.meta, plan.dims.pp, plan.num_stages)
        # What the time reads of the converted shape (counts, shares, bytes gathered) does not depend on the
        # microbatch; the memory estimate's does (transient copies sized by it).
        split_key = (*key, plan.dims.tp, plan.dims.fsdp_shards)
        if split_key not in converted_cache:
            converted_cache[split_key] = converted_estimate(plan, precision, parts_cache[key])
        prediction = predict(plan, profile, precision, parts_cache[key], nodes=nodes, converted=converted_cache[split_key],
                             memory=False)
        timed.append((prediction, c, plan, parts_cache[key]))
    timed.sort(key=lambda t: -t[0].tokens_per_s)
    ranked, sized = [], 0
    fits: set[Candidate] = set()  # layouts that fit with less recomputation
    for prediction, c, plan, parts in timed:
        if len(ranked) >= keep:
            break
        if dataclasses.replace(c, ac=ac_modes[0]) in fits:
            rejected["slower than the same layout with less recomputation, which fits"] += 1
            continue
        if _stored_bytes(plan, precision, converted_cache[(c.float8, plan.dims.pp, plan.num_stages, plan.dims.tp,
                                                          plan.dims.fsdp_shards)]) > limit:
            rejected[f"over {margin:.0%} of the memory (its weights and optimizer state alone)"] += 1
            continue
        sized += 1
        shape_key = (c.float8, plan.dims.pp, plan.num_stages, plan.dims.tp, plan.dims.fsdp_shards, plan.dims.cp,
                     c.local_batch // plan.pp_microbatches)
        if shape_key not in converted_cache:
            converted_cache[shape_key] = converted_estimate(plan, precision, parts)
        prediction = with_memory(prediction, plan, precision, parts, converted_cache[shape_key])
        if prediction.device_bytes > limit:
            rejected[f"over {margin:.0%} of the memory"] += 1
            continue
        fits.add(dataclasses.replace(c, ac=ac_modes[0]))
        ranked.append(Ranked(c, plan, prediction))
    ranked.sort(key=lambda r: (-r.prediction.tokens_per_s, r.prediction.device_bytes))
    return Search(ranked=ranked, rejected=rejected, considered=considered, sized=sized, usable_bytes=limit)


def _stored_bytes(plan: Plan, precision: Precision, converted) -> float:
    """A lower bound of the device memory the estimate gives: the stored weights and the optimizer's state
    (nothing offloads them here, and no line of the estimate offsets them); a quarter of a millisecond where
    the estimate takes tens for a large model."""
    cfg = plan.cfg
    if cfg.parallel.cpu_offload or cfg.optimizer.offload == "cpu":
        return 0.0
    shape, estimate = converted
    return estimate.weights + state_bytes(cfg.optimizer.name, [shape.trainable * shape.share])


def streams_note(num_streams: int, best: Ranked) -> str | None:
    n = streams_for(num_streams, best.plan.dims.dp_size)
    if n != num_streams:
        return (f"data.num_streams={n} (from {num_streams}): the data-parallel size {best.plan.dims.dp_size} must "
                f"divide it; it sets the data order, so keep it across restarts")
    return None


def predict_plan(plan: Plan, profile: DeviceProfile, *, nodes: int = 1) -> Prediction:
    """The prediction for a plan made by make_plan (what bench.planner checks against measurement)."""
    return predict(plan, profile, precision_on(plan.cfg.training, profile), busiest_parts(plan), nodes=nodes)
