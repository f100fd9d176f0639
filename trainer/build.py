"""A run's model from its Plan: the converted meta model -> pipeline stages -> parallelized -> materialized
unit by unit, so nothing large is ever whole on a rank (torchtitan's order). And the same model rebuilt
whole in one process from a checkpoint of a run (exports of pipelined runs, generation), through the
same unit-by-unit materialization."""

from functools import partial
from pathlib import Path

import torch
from torch import nn

from models import Decoder, DecoderArgs, build_meta_model
from parallel.mesh import Meshes, ParallelDims
from parallel.parallelize import materialize_units, parallelize
from parallel.pp import build_schedule
from trainer.checkpoint.paths import checkpoint_root, complete_steps, latest_step_dir, step_dir
from trainer.checkpoint.safe_reader import load_safely
from trainer.checkpoint.state import ModelState
from trainer.config import load_config
from trainer.converters import ModelConverter, build_converters
from trainer.loss import TokenLoss
from trainer.plan import Plan
from trainer.precision import Precision
from trainer.errors import CheckpointError
from trainer.weights.dcp_import import read_dcp_args
from trainer.weights.load import load_model, open_weights
from trainer.weights.materialize import materialize_unit

_ONE_PROCESS = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1, world_size=1)


def materialize_converted(unit: nn.Module, unit_name: str, *, weights, converters: list[ModelConverter], device: torch.device,
                 shards: int, seed: int, frozen_dtype: torch.dtype) -> None:
    """One unit leaves the meta device just before FSDP shards it (the only way any model here does): its
    base weights from model.init_from or the seeded init, then each converter's part."""
    pieces = materialize_unit(unit, unit_name, device=device, weights=weights)
    for converter in converters:
        converter.finish_unit(pieces, shards=shards, seed=seed, frozen_dtype=frozen_dtype)


def build_model(plan: Plan, *, meshes: Meshes, precision: Precision, device: torch.device,
                loss_fn: TokenLoss) -> tuple[list[nn.Module], object]:
    """(this rank's model parts, the pipeline schedule or None). Without pipeline stages the one part is
    plan.meta itself, materialized in place."""
    cfg = plan.cfg
    parts = [(0, plan.meta)]
    if meshes.pp.active:  # converted before the split: stages keep the converted modules of their layers
        parts = plan.family.split_stages(plan.meta, pp_rank=meshes.pp.local_rank, pp_size=plan.dims.pp,
                                         num_stages=plan.num_stages)
    weights = open_weights(cfg.model.init_from, plan.model_args, cfg.job.seed, plan.base_shapes, device)
    materialize = partial(materialize_converted, weights=weights, converters=plan.converters, device=device,
                          shards=plan.dims.fsdp_shards if meshes.fsdp.active else 1, seed=cfg.job.seed,
                          frozen_dtype=precision.param_dtype)
    for _, part in parts:
        tp_plan = plan.family.tp_plan(part, loss_parallel=cfg.parallel.loss_parallel, styles=plan.info.tp_styles) if meshes.tp.active else None
        parallelize(
            part, tp_mesh=meshes.tp.mesh, tp_plan=tp_plan, ac_mode=cfg.activation_checkpoint.mode,
            ac_every=cfg.activation_checkpoint.every, compile=cfg.compile.enabled, fsdp_mesh=meshes.fsdp.mesh,
            param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype,
            reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward, cpu_offload=cfg.parallel.cpu_offload,
            materialize=materialize, cp_mesh=meshes.cp.mesh, ep_mesh=meshes.ep.mesh, expert_fsdp_mesh=meshes.expert_fsdp.mesh,
            moe_fsdp_mesh=meshes.moe_fsdp.mesh, ac_offload=cfg.activation_checkpoint.offload,
        )
        part.train()
        part.attention_kernel = plan.attention_kernel
        if plan.chunked_loss and part.norm is not None:  # the last stage (on the last pipeline rank)
            # It stops at the final norm; the loss projects, chunk by chunk (trainer/loss.py).
            part.project = False
            loss_fn.head = part.head_weight
    schedule = None
    if meshes.pp.active:
        schedule = build_schedule(parts, num_stages=plan.num_stages, pp_mesh=meshes.pp.mesh, device=device,
                                  schedule=cfg.parallel.pp_schedule, n_microbatches=plan.pp_microbatches, loss_fn=loss_fn)
    return [part for _, part in parts], schedule


def build_whole_model(args: DecoderArgs, converters: list[ModelConverter], *, init_from: str | Path | None, seed: int,
                      device: str | torch.device = "cpu", frozen_dtype: torch.dtype = torch.float32) -> Decoder:
    """The whole converted model in one process, its base from `init_from` (or the seeded init),
    materialized unit by unit as the trainer does without FSDP (a 4-bit base is never whole in high
    precision)."""
    model = build_meta_model(args)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for converter in converters:
        converter.convert(model, _ONE_PROCESS)
    weights = open_weights(init_from, args, seed, shapes, device)
    materialize_units(model, partial(materialize_converted, weights=weights, converters=converters, device=torch.device(device),
                                     shards=1, seed=seed, frozen_dtype=frozen_dtype))
    return model


def load_run_model(step_path: Path, device: str | torch.device = "cpu") -> Decoder:
    """The model of the run whose checkpoint `step_path` is (run/checkpoints/step-N), whole, in eval mode.
    Converters whose checkpoints hold only what trains (adapters) rebuild the rest from the run's config,
    as at its start; the others' checkpoints hold plain weights (float8's too), read as they are, and
    converted again where the run's forward is not the plain one (QAT's rounding)."""
    step_path = Path(step_path)
    cfg = load_config(step_path.parent.parent / "config.yaml")
    converters = [c for c in build_converters(cfg) if c.checkpoints_trainable_only or c.reapplied_on_load]
    if not any(c.checkpoints_trainable_only for c in converters):
        model = load_model(step_path, str(device))
        for converter in converters:
            converter.convert(model, _ONE_PROCESS)  # swaps layers in place, weights and all
        return model.eval()
    model = build_whole_model(read_dcp_args(step_path), converters, init_from=cfg.model.init_from, seed=cfg.job.seed,
                              device=device)
    load_safely({"model": ModelState([model], "trainable")}, step_path, no_dist=True,
                what=f"{step_path}: cannot load its adapters")
    return model.eval()


def load_run(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu") -> Decoder:
    """The model of the run in `run_dir` at its checkpoint `step` (default: the latest), in eval mode."""
    root = checkpoint_root(Path(run_dir))
    latest = latest_step_dir(root)
    if latest is None:
        raise CheckpointError(f"{root}: no complete checkpoint to take the model from")
    if step is not None and step not in complete_steps(root):
        raise CheckpointError(f"{root}: no complete checkpoint of step {step} (there are: "
                              f"{', '.join(map(str, complete_steps(root)))})")
    return load_run_model(latest if step is None else step_dir(root, step), device)
