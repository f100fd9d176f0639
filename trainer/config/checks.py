"""Checks of values and combinations that the schema's types cannot express.

Each check raises ConfigError with one line naming the key, the value and what to do. They all run before
any model or data work starts.
"""

import importlib
import importlib.util
import math
from pathlib import Path

from trainer.config.schema import (
    CHOICES, QUANTIZED_EXPORTS, AdaptersConfig, Config, DataConfig, DataSourceConfig, DistillConfig, EvalConfig, ExportConfig, FaultConfig, Float8Config, JobConfig,
    LRSchedulerConfig, ModelConfig, OptimizerConfig, ParallelConfig, QATConfig, TrainingConfig,
)
from trainer.errors import ConfigError


def _finite(value: float) -> bool:
    return not math.isnan(value) and not math.isinf(value)


def _require(ok: bool, dotted: str, value, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{dotted}={value} {rule}")


def check_choices(cfg: Config) -> None:
    """Every value on its own (choices, ranges, finiteness) and the combinations that need no file read."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of: {', '.join(allowed)}")
    positive = {
        "training.steps": cfg.training.steps,
        "training.local_batch_size": cfg.training.local_batch_size,
        "training.seq_len": cfg.training.seq_len,
        "training.max_bad_steps": cfg.training.max_bad_steps,
        "data.num_streams": cfg.data.num_streams,
        "metrics.log_every": cfg.metrics.log_every,
        "parallel.dp_replicate": cfg.parallel.dp_replicate,
        "parallel.tp": cfg.parallel.tp,
        "parallel.cp": cfg.parallel.cp,
        "parallel.pp": cfg.parallel.pp,
        "parallel.pp_stages_per_rank": cfg.parallel.pp_stages_per_rank,
        "activation_checkpoint.every": cfg.activation_checkpoint.every,
        "checkpoint.interval": cfg.checkpoint.interval,
    }
    for dotted, value in positive.items():
        _require(value >= 1, dotted, value, "must be at least 1")
    _require(0 <= cfg.job.seed < 2**63, "job.seed", cfg.job.seed, "must lie in [0, 2**63)")
    _check_optimizer(cfg.optimizer, cfg.lr_scheduler, cfg.training)
    _check_model(cfg.model)
    _require(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", cfg.checkpoint.keep_last, "must be 0 (keep all) or more")
    peak = cfg.metrics.peak_tflops
    if peak is not None:
        _require(_finite(peak) and peak > 0, "metrics.peak_tflops", peak,
                 "must be a positive number of TFLOP/s per device (or null to look it up / measure it)")
    _check_adapters(cfg.adapters, cfg.parallel, cfg.export)
    _check_qat(cfg.qat, fp8_enabled=cfg.fp8.enabled, quantize_base=cfg.adapters.quantize_base)
    _check_quantized_exports(cfg.export.quantized, "export.quantized")
    _check_quantized_exports(cfg.eval.quantized, "eval.quantized")
    if cfg.eval.quantized and cfg.eval.every == 0:
        raise ConfigError(f"eval.quantized={cfg.eval.quantized} evaluates at each validation, and eval.every=0 runs none: "
                          f"set eval.every (and held-out data: eval.source or eval.split_fraction)")
    if cfg.eval.quantized and cfg.adapters.kind != "none":
        raise ConfigError(f"eval.quantized with adapters.kind={cfg.adapters.kind}: the exports quantize the merged "
                          f"weights, which the run never holds; evaluate the export instead (python -m trainer.export "
                          f"RUN OUT --quantized NAME, then model.init_from=OUT or python -m trainer.generate OUT)")
    _check_fp8(cfg.fp8, cfg.adapters)
    _require(cfg.parallel.auto_profile is None or cfg.parallel.auto, "parallel.auto_profile", cfg.parallel.auto_profile,
             "is the device profile parallel.auto=true plans with: set parallel.auto=true, or remove it")
    _require(not (cfg.optimizer.offload == "cpu" and cfg.parallel.cpu_offload), "optimizer.offload", "cpu",
             "is already part of parallel.cpu_offload=true (FSDP keeps parameters, gradients and the optimizer on "
             "the host): use one of them")
    _require(not (cfg.activation_checkpoint.offload and cfg.compile.enabled), "activation_checkpoint.offload", True,
             "cannot be combined with compile.enabled=true: torch.compile cannot trace the saved-tensor hooks inside "
             "a compiled block (torch 2.13); turn one of them off")
    _require(cfg.training.loss_chunk_tokens >= 1, "training.loss_chunk_tokens", cfg.training.loss_chunk_tokens,
             "must be at least 1")
    bad_steps = [s for s in cfg.metrics.profile_steps if not 1 <= s <= cfg.training.steps]
    _require(not bad_steps, "metrics.profile_steps", cfg.metrics.profile_steps,
             f"must hold step numbers from 1 to training.steps={cfg.training.steps} (not {bad_steps})")
    _require(cfg.data.prefetch >= 0, "data.prefetch", cfg.data.prefetch, "must be 0 (no background thread) or more")
    _check_fault(cfg.fault, cfg.training.steps)
    check_replica_groups(cfg.fault, cfg.parallel, cfg.optimizer)
    _check_eval(cfg.eval, cfg.data.sources)
    _check_distill(cfg.distill)
    _check_moe(cfg.moe)
    _check_paths(cfg.job, cfg.data)


def _check_fault(f: FaultConfig, steps: int) -> None:
    from trainer.fault.inject import check_faults

    _require(_finite(f.hang_timeout_s) and f.hang_timeout_s >= 0, "fault.hang_timeout_s", f.hang_timeout_s,
             "must be 0 (no watchdog) or a number of seconds")
    _require(f.straggler_factor == 0 or (_finite(f.straggler_factor) and f.straggler_factor > 1), "fault.straggler_factor",
             f.straggler_factor, "must be 0 (not measured) or a factor above 1 (e.g. 1.3)")
    _require(f.straggler_steps >= 1, "fault.straggler_steps", f.straggler_steps, "must be at least 1")
    check_faults(f.inject, steps)
    _require(f.replica_groups >= 1, "fault.replica_groups", f.replica_groups, "must be at least 1 (1: no replica groups)")
    _require(0 <= f.replica_id < f.replica_groups, "fault.replica_id", f.replica_id,
             f"must be a group of fault.replica_groups={f.replica_groups} (0 to {f.replica_groups - 1})")
    _require(1 <= f.min_replicas <= f.replica_groups, "fault.min_replicas", f.min_replicas,
             f"must lie in [1, fault.replica_groups={f.replica_groups}]")
    _require(_finite(f.replica_timeout_s) and f.replica_timeout_s > 0, "fault.replica_timeout_s", f.replica_timeout_s,
             "must be a positive number of seconds")


def check_replica_groups(f: FaultConfig, parallel: ParallelConfig, optimizer: OptimizerConfig) -> None:
    """What replica groups need: torchft, a Lighthouse, and settings whose state a peer can hand over."""
    if f.replica_groups == 1:
        return
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError(f"fault.replica_groups={f.replica_groups} needs torchft: pip install torchft (or the project's "
                          f"`ft` extra), or set fault.replica_groups=1")
    import os

    if not (f.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
        raise ConfigError(f"fault.replica_groups={f.replica_groups}: no torchft Lighthouse: set fault.lighthouse=http://HOST:PORT "
                          f"(or TORCHFT_LIGHTHOUSE), or start the groups with python -m launch local --replica-groups N")
    _require(parallel.dp_replicate == 1, "parallel.dp_replicate", parallel.dp_replicate,
             "must be 1 with fault.replica_groups: the replica groups are the replicated dimension")
    _require(optimizer.name == "adamw" and optimizer.offload == "none", "optimizer.name", optimizer.name,
             "with fault.replica_groups: a recovering group takes a peer's optimizer state, done for adamw without "
             "optimizer.offload so far")


def _check_optimizer(o: OptimizerConfig, s: LRSchedulerConfig, t: TrainingConfig) -> None:
    _require(_finite(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be a positive, finite number")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        _require(0.0 <= value < 1.0, f"optimizer.{key}", value, "must lie in [0, 1)")
    _require(_finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be a positive, finite number (e.g. 1e-8)")
    _require(_finite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
             "must be 0 (off) or a positive, finite number")
    _require(o.implementation == "auto" or o.name == "adamw", "optimizer.implementation", o.implementation,
             f"chooses among torch AdamW's kernels and applies to optimizer.name=adamw only (not {o.name}): "
             "leave it at auto")
    _require(o.offload == "none" or o.name in ("adamw", "adamw_bf16"), "optimizer.offload", o.offload,
             f"works with optimizer.name adamw or adamw_bf16 (not {o.name}: its moments are small already, and its "
             "quantized step is made for the device)")
    if o.name in ("adamw_8bit", "adamw_4bit"):
        try:
            importlib.import_module("torchao.optim")
        except ImportError as e:
            raise ConfigError(f"optimizer.name={o.name}: needs torchao's low-bit optimizers, which do not import "
                              f"({e}): pip install torchao, or choose adamw / adamw_bf16") from None
    _require(0.0 <= s.min_lr_ratio <= 1.0, "lr_scheduler.min_lr_ratio", s.min_lr_ratio, "must lie in [0, 1]")
    _require(s.warmup_steps >= 0, "lr_scheduler.warmup_steps", s.warmup_steps, "must be 0 or more")
    _require(_finite(t.max_norm) and t.max_norm >= 0, "training.max_norm", t.max_norm,
             "must be 0 (no clipping) or a positive, finite number")


_MAX_SIZE = 2**24


def _check_model(m: ModelConfig) -> None:
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "max_seq_len"):
        value = getattr(m, key)
        if value is not None:
            _require(value >= 1, f"model.{key}", value, "must be at least 1 (or null to take the flavor's)")
            # 16.7M: far above any real model's size (Llama 3.1 405B: dim 16,384, vocabulary 128,256), and far
            # below what overflows torch's shape arithmetic when the model is built.
            _require(value <= _MAX_SIZE, f"model.{key}", value, f"is over {_MAX_SIZE:,}: is it a typo?")
    for key in ("rope_theta", "norm_eps"):
        value = getattr(m, key)
        if value is not None:
            _require(_finite(value) and value > 0, f"model.{key}", value,
                     "must be a positive, finite number (or null to take the flavor's)")


def _check_eval(e: EvalConfig, sources: list[DataSourceConfig]) -> None:
    _require(e.every >= 0, "eval.every", e.every, "must be 0 (no validation) or a number of steps")
    _require(e.steps >= 1, "eval.steps", e.steps, "must be at least 1")
    _require(e.sample_tokens >= 1, "eval.sample_tokens", e.sample_tokens, "must be at least 1")
    _require(0.0 <= e.split_fraction < 1.0, "eval.split_fraction", e.split_fraction,
             "must lie in [0, 1) (the share of the training documents held out)")
    if e.source is not None and e.split_fraction > 0:
        raise ConfigError(
            f"eval.source={e.source} and eval.split_fraction={e.split_fraction} are two ways to get held-out data: "
            f"give one of them"
        )
    if e.every > 0 and e.source is None and e.split_fraction == 0 and not any(s.eval_source for s in sources):
        raise ConfigError(
            f"eval.every={e.every} needs held-out data: set eval.source (files, a directory or hub:NAME) or "
            f"eval.split_fraction (e.g. 0.05 of the training documents), or a mixture source's eval_source"
        )


def _check_distill(d: DistillConfig) -> None:
    _require(0.0 <= d.kd_ratio <= 1.0, "distill.kd_ratio", d.kd_ratio,
             "must lie in [0, 1] (the KL's share of the loss; the cross-entropy takes the rest)")
    _require(d.temperature > 0 and math.isfinite(d.temperature), "distill.temperature", d.temperature,
             "must be a positive, finite number")
    _require(d.chunk_tokens >= 1, "distill.chunk_tokens", d.chunk_tokens, "must be at least 1")


def _check_moe(m) -> None:
    if m.aux_loss_coef is not None:
        _require(m.aux_loss_coef >= 0 and math.isfinite(m.aux_loss_coef), "moe.aux_loss_coef", m.aux_loss_coef,
                 "must be a finite number >= 0 (0 turns the load-balancing loss off)")
    _require(m.bias_update_rate >= 0 and math.isfinite(m.bias_update_rate), "moe.bias_update_rate", m.bias_update_rate,
             "must be a finite number >= 0 (0 freezes the expert bias)")


def _check_fp8(f: Float8Config, adapters: AdaptersConfig) -> None:
    if not f.enabled:
        return
    if f.fsdp_float8_all_gather and f.recipe != "tensorwise":
        raise ConfigError(
            f"fp8.fsdp_float8_all_gather=true needs fp8.recipe=tensorwise, not {f.recipe}: a {f.recipe} weight has a "
            f"scale per row, which torchao cannot gather in float8; set fp8.recipe=tensorwise or "
            f"fp8.fsdp_float8_all_gather=false"
        )
    if f.auto_filter_small_kn and f.recipe == "rowwise_with_gw_hp":
        raise ConfigError(
            "fp8.auto_filter_small_kn=true has no size thresholds for fp8.recipe=rowwise_with_gw_hp (torchao measured "
            "tensorwise and rowwise only): set fp8.auto_filter_small_kn=false and list layers in fp8.filter_fqns"
        )
    for name in f.filter_fqns:
        _require(isinstance(name, str) and name != "", "fp8.filter_fqns", f.filter_fqns,
                 "must be a list of non-empty name fragments (e.g. [feed_forward.w2])")
    q = adapters.quantize_base
    if q != "none":
        raise ConfigError(
            f"fp8.enabled=true with adapters.quantize_base={q}: a 4-bit base is dequantized for every matmul, and "
            f"float8 would round that copy again to 8 bits (two losses, and no float8 weight to keep: torchao's float8 "
            f"linears cast a high-precision weight); train a 4-bit base with fp8.enabled=false, or float8 over a "
            f"bf16 base with adapters.quantize_base=none"
        )


def _check_adapters(a: AdaptersConfig, parallel: ParallelConfig, export: ExportConfig) -> None:
    if a.kind != "none":
        _require(a.rank >= 1, "adapters.rank", a.rank, "must be at least 1")
        _require(_finite(a.alpha) and a.alpha > 0, "adapters.alpha", a.alpha, "must be a positive, finite number")
        _require(0.0 <= a.dropout < 1.0, "adapters.dropout", a.dropout, "must lie in [0, 1)")
        if a.quantize_base != "none" and parallel.tp > 1:
            raise ConfigError(
                f"adapters.quantize_base={a.quantize_base} with parallel.tp > 1 is not supported: shard a 4-bit base "
                f"with FSDP (parallel.dp_shard) and/or pp, or keep parallel.tp with quantize_base=none"
            )
        _require(a.hqq_group_size >= 1, "adapters.hqq_group_size", a.hqq_group_size, "must be at least 1")
    elif a.quantize_base != "none":
        raise ConfigError(
            f"adapters.quantize_base={a.quantize_base} quantizes the frozen base under adapters: set adapters.kind "
            f"to lora or dora (QLoRA / QDoRA), or quantize_base=none"
        )
    elif export.peft:
        raise ConfigError("export.peft writes an adapter: set adapters.kind to lora or dora (or use export.hf)")


def _check_quantized_exports(names: list[str], key: str) -> None:
    for name in names:
        if name not in QUANTIZED_EXPORTS:
            raise ConfigError(f"{key}: {name!r} is not a quantized export (one of: {', '.join(QUANTIZED_EXPORTS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}={names} names an export twice")


def _check_qat(q: QATConfig, *, fp8_enabled: bool, quantize_base: str) -> None:
    if q.scheme == "none":
        return
    if fp8_enabled:
        raise ConfigError(f"qat.scheme={q.scheme} with fp8.enabled=true: both decide how the same linear layers "
                          f"multiply; train with one of them (float8 training's rowwise recipe already computes as "
                          f"W8A8 float8 serving does: fp8.recipe=rowwise)")
    if quantize_base != "none":
        raise ConfigError(f"qat.scheme={q.scheme} over adapters.quantize_base={quantize_base}: the base is already "
                          f"stored in 4 bits, with its own rounding; QAT would round it a second time. Set "
                          f"adapters.quantize_base=none (QAT + LoRA over a bf16 base) or qat.scheme=none")
    _require(q.group_size >= 2, "qat.group_size", q.group_size, "must be at least 2 (input features that share one scale; 32 or 128 are usual)")
    _require(q.start_step >= 0, "qat.start_step", q.start_step, "must be 0 (round from the first step) or more")


def source_names(sources: list[DataSourceConfig]) -> list[str]:
    """Each mixture source's name: its own, else its file's or directory's (or the Hub dataset's) name."""
    names = []
    for src in sources:
        path = src.source.removeprefix("hub:").rstrip("/")
        names.append(src.name or (Path(path).stem if not src.source.startswith("hub:") else path.split("/")[-1]))
    return names


def _check_sources(d: DataConfig) -> None:
    """data.sources (a mixture): sources named, weights usable, names distinct, their own settings valid."""
    if not d.sources:
        return
    if d.source != "stdlib":
        raise ConfigError(f"data.source={d.source} and data.sources are both set: a run reads one source or a mixture; "
                          f"move data.source into data.sources (with its weight) or remove data.sources")
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not src.source:
            raise ConfigError(f"{key} has no source: give each mixture entry a source (a file, directory, glob or hub:NAME)")
        _require(_finite(src.weight) and src.weight >= 0, f"{key}.weight", src.weight,
                 "must be a finite number of 0 or more (a source's share is its weight over the weights' sum)")
        for field_name in ("format", "text_sample_by"):
            value, allowed = getattr(src, field_name), CHOICES[f"data.{field_name}"]
            if value is not None and value not in allowed:
                raise ConfigError(f"{key}.{field_name}={value!r} is not one of: {', '.join(allowed)}")
    if sum(src.weight for src in d.sources) <= 0:
        raise ConfigError(f"data.sources: every weight is 0 ({', '.join(str(s.weight) for s in d.sources)}): give at "
                          f"least one source a positive weight")
    names = source_names(d.sources)
    slashed = [n for n in names if "/" in n or not n.strip()]
    if slashed:
        raise ConfigError(f"data.sources: the name {slashed[0]!r} cannot name metrics (data/NAME): set a name without '/'")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"data.sources: more than one source is named {twice[0]!r}; give them distinct names (name: ...)")


def _check_paths(job: JobConfig, d: DataConfig) -> None:
    out = Path(job.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"job.output_dir={out} is an existing file, not a directory: choose another job.output_dir")
    _check_sources(d)
    if not d.source.startswith("hub:"):
        # Only a Hub dataset has named splits and configs; silently ignoring them would train on other data.
        if d.split != "train":
            raise ConfigError(
                f"data.split={d.split} applies to hub:NAME datasets only; data.source={d.source} is read whole: "
                f"point data.source at the file you want"
            )
        if d.hub_config is not None:
            raise ConfigError(f"data.hub_config={d.hub_config} applies to hub:NAME datasets only; remove it")


def check_batch(t: TrainingConfig, dp_size: int) -> int:
    """Returns the number of gradient-accumulation microbatches per step."""
    local, global_ = t.local_batch_size, t.global_batch_size
    if global_ == -1:
        return 1
    per_pass = local * dp_size
    if global_ < 1 or global_ % per_pass:
        raise ConfigError(
            f"training.global_batch_size={global_} is not a multiple of training.local_batch_size x "
            f"data-parallel size = {local} x {dp_size} = {per_pass}; set it to a multiple of {per_pass} "
            f"(or -1 for no accumulation)"
        )
    return global_ // per_pass


def check_streams(d: DataConfig, dp_size: int) -> None:
    if d.num_streams % dp_size:
        raise ConfigError(
            f"data.num_streams={d.num_streams} is not a multiple of the data-parallel size {dp_size}: "
            f"set data.num_streams to a multiple of {dp_size} (keep it fixed across restarts to resume exactly)"
        )


def check_seq_len(t: TrainingConfig, max_seq_len: int) -> None:
    if t.seq_len > max_seq_len:
        raise ConfigError(
            f"training.seq_len={t.seq_len} is over the model's maximum sequence length "
            f"{max_seq_len}; lower training.seq_len or raise model.max_seq_len"
        )


def check_pipeline(p: ParallelConfig, t: TrainingConfig, pp: int) -> int:
    """Returns the number of pipeline microbatches per local batch (1 without pipelining)."""
    if pp == 1:
        return 1
    n = pp if p.pp_microbatches == -1 else p.pp_microbatches
    if n < 1 or t.local_batch_size % n:
        raise ConfigError(
            f"parallel.pp_microbatches={n} does not divide training.local_batch_size={t.local_batch_size}; "
            f"pick a divisor of the local batch"
        )
    if p.pp_schedule == "interleaved_1f1b":
        if p.pp_stages_per_rank < 2:
            raise ConfigError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank of 2 or more")
        if n % pp:
            raise ConfigError(
                f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_microbatches ({n}) to be a multiple of pp ({pp})"
            )
    return n
