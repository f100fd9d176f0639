"""The layouts a plan chooses among: every split of the world into pp x dp_replicate x dp_shard x cp x tp
(ep within dp_shard for models with experts) that the model's shape and the run's checks allow, each with
the activation checkpointing modes, the microbatch sizes that make the configured global batch (the rest by
gradient accumulation), pipeline schedules and microbatch counts, and float8 on and off where the config and
the device allow it. A candidate is the config's overrides; `variant_plan` turns it into a Plan without
building the model again (the converted meta model of the base plan is shared)."""

import dataclasses
from dataclasses import dataclass

from parallel.mesh import LayoutError, ParallelDims
from trainer.config import ConfigError
from trainer.config.schema import ParallelConfig, TrainingConfig
from trainer.config.checks import check_batch, check_pipeline
from trainer.expert_balance import check_moe_settings
from trainer.plan import (Plan, check_blocks_take_masks, check_context_parallel, check_layout_fits_model,
                          decide_chunked_loss, stages_per_rank)

AC_MODES = ("none", "selective_op", "selective_layer", "full")


@dataclass(frozen=True)
class Candidate:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int
    local_batch: int  # sequences per forward pass on a rank (the local batch)
    accum_steps: int
    ac: str
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 1
    float8: bool = False

    def layout(self) -> str:
        parts = [f"pp {self.pp}"] if self.pp > 1 else []
        if self.dp_replicate > 1:
            parts.append(f"rep {self.dp_replicate}")
        if self.dp_shard > 1:
            parts.append(f"fsdp {self.dp_shard}" + (f" (ep {self.ep})" if self.ep > 1 else ""))
        parts += [f"{name} {size}" for name, size in (("cp", self.cp), ("tp", self.tp)) if size > 1]
        return " x ".join(parts) or "1 rank"

    def overrides(self, num_streams: int) -> list[str]:
        """The config overrides that run this candidate (num_streams: the data streams the run needs)."""
        out = [f"parallel.pp={self.pp}", f"parallel.dp_replicate={self.dp_replicate}", f"parallel.dp_shard={self.dp_shard}",
               f"parallel.cp={self.cp}", f"parallel.tp={self.tp}", f"parallel.ep={self.ep}",
               f"training.local_batch_size={self.local_batch}",
               f"training.global_batch_size={self.local_batch * self.accum_steps * self.dp_replicate * self.dp_shard}",
               f"activation_checkpoint.mode={self.ac}", f"fp8.enabled={str(self.float8).lower()}"]
        if self.pp > 1:
            out += [f"parallel.pp_schedule={self.pp_schedule}", f"parallel.pp_microbatches={self.pp_microbatches}"]
        return out + [f"data.num_streams={num_streams}"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def global_batch(training: TrainingConfig, p: ParallelConfig, world_size: int) -> int:
    """Sequences per optimizer step the plan keeps: training.global_batch_size, or (-1) the local batch over
    the configured layout's data-parallel ranks (every rank data-parallel where that layout does not fit)."""
    if training.global_batch_size != -1:
        return training.global_batch_size
    try:
        dims = ParallelDims.from_sizes(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, cp=p.cp,
                                       ep=p.ep, world_size=world_size)
        return training.local_batch_size * dims.dp_size
    except LayoutError:
        return training.local_batch_size * world_size


def streams_for(num_streams: int, dp_size: int) -> int:
    """data.num_streams as configured where the layout's data-parallel size divides it, else the next multiple."""
    return num_streams if num_streams % dp_size == 0 else -(-num_streams // dp_size) * dp_size


def enumerate_candidates(training: TrainingConfig, parallel: ParallelConfig, args, world_size: int, *, max_tp: int,
                         float8_options: tuple[bool, ...],
                         ac_modes: tuple[str, ...] = AC_MODES, max_local_batch: int = 16):
    """Every candidate for `world_size` ranks (tp at most max_tp: a node's devices)."""
    batch = global_batch(training, parallel, world_size)
    experts = getattr(args, "num_experts", 0)
    seq = training.seq_len
    for tp in [d for d in divisors(world_size) if d <= max_tp]:
        for cp in [d for d in divisors(world_size // tp) if d <= 16 and seq % (2 * d) == 0 and seq // d >= 256 or d == 1]:
            for pp in [d for d in divisors(world_size // (tp * cp)) if d == 1 or 2 * d <= args.n_layers]:
                dp = world_size // (tp * cp * pp)
                if batch % dp:
                    continue
                per_rank = batch // dp
                for rep in divisors(dp):
                    shard = dp // rep
                    for ep in ([d for d in divisors(shard) if experts % (d * tp) == 0] if experts else [1]):
                        for local in [d for d in divisors(per_rank) if d <= max_local_batch]:
                            for schedule, micro in _pipeline_options(pp, local):
                                for float8 in float8_options:
                                    for ac in ac_modes:  # cheapest recomputation first
                                        yield Candidate(pp=pp, dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, ep=ep,
                                                        local_batch=local, accum_steps=per_rank // local, ac=ac,
                                                        pp_schedule=schedule, pp_microbatches=micro, float8=float8)


def _pipeline_options(pp: int, local: int):
    if pp == 1:
        yield "1f1b", 1
        return
    for micro in (pp, 2 * pp, 4 * pp):
        if local % micro == 0:
            yield "1f1b", micro
            yield "interleaved_1f1b", micro


def variant_plan(base: Plan, c: Candidate, world_size: int) -> Plan:
    """The base plan with the candidate's layout and batch; ConfigError where a check refuses it (the same
    checks a start runs for these sections)."""
    cfg = base.cfg
    parallel = dataclasses.replace(cfg.parallel, pp=c.pp, dp_replicate=c.dp_replicate, dp_shard=c.dp_shard, cp=c.cp,
                                   tp=c.tp, ep=c.ep, pp_schedule=c.pp_schedule, pp_microbatches=c.pp_microbatches)
    training = dataclasses.replace(cfg.training, local_batch_size=c.local_batch,
                                   global_batch_size=c.local_batch * c.accum_steps * c.dp_replicate * c.dp_shard)
    ac = dataclasses.replace(cfg.activation_checkpoint, mode=c.ac)
    data = dataclasses.replace(cfg.data, num_streams=streams_for(cfg.data.num_streams, c.dp_replicate * c.dp_shard))
    new = dataclasses.replace(cfg, parallel=parallel, training=training, activation_checkpoint=ac, data=data)
    try:
        dims = ParallelDims.from_sizes(dp_replicate=c.dp_replicate, dp_shard=c.dp_shard, tp=c.tp, pp=c.pp, cp=c.cp,
                                       ep=c.ep, world_size=world_size)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    accum = check_batch(training, dims.dp_size)
    micro = check_pipeline(parallel, training, dims.pp)
    check_context_parallel(dims, training.seq_len)
    check_layout_fits_model(dims, base.model_args, parallel)
    why = check_moe_settings(new.moe, base.model_args, dims, compiled=new.compile.enabled)
    if why is not None:
        raise ConfigError(why)
    check_blocks_take_masks(base.meta, base.family.name, base.attention, dims.cp)
    num_stages = dims.num_stages(stages_per_rank(parallel))
    if num_stages > base.model_args.n_layers:
        raise ConfigError(f"{num_stages} pipeline stages for {base.model_args.n_layers} layers")
    chunked = decide_chunked_loss(new.training.chunked_loss, dims, base.meta, distilling=base.teacher_args is not None)
    return dataclasses.replace(base, cfg=new, dims=dims, accum_steps=accum, pp_microbatches=micro, num_stages=num_stages,
                               chunked_loss=chunked)
