"""Checks of values and combinations that the schema's types cannot express.

Each check raises ConfigError with one line naming the key, the value and what to do. They all run before
any model or data work starts.
"""

from trainer.config.schema import CHOICES, Config


class ConfigError(ValueError):
    """A user mistake in the config file or the command line."""


def check_choices(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of: {', '.join(allowed)}")
    positive = {
        "training.steps": cfg.training.steps,
        "training.local_batch_size": cfg.training.local_batch_size,
        "training.seq_len": cfg.training.seq_len,
        "data.num_streams": cfg.data.num_streams,
        "metrics.log_every": cfg.metrics.log_every,
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "parallel.pp_stages_per_rank": cfg.parallel.pp_stages_per_rank,
        "activation_checkpoint.every": cfg.activation_checkpoint.every,
        "checkpoint.interval": cfg.checkpoint.interval,
    }
    for dotted, value in positive.items():
        if value < 1:
            raise ConfigError(f"{dotted}={value} must be at least 1")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={cfg.optimizer.lr} must be positive")
    if not 0.0 <= cfg.lr_scheduler.min_lr_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_ratio={cfg.lr_scheduler.min_lr_ratio} must lie in [0, 1]")
    if cfg.lr_scheduler.warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps={cfg.lr_scheduler.warmup_steps} must be 0 or more")
    if cfg.checkpoint.keep_last < 0:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be 0 (keep all) or more")
    a = cfg.adapters
    if a.kind != "none":
        if a.rank < 1:
            raise ConfigError(f"adapters.rank={a.rank} must be at least 1")
        if a.alpha <= 0:
            raise ConfigError(f"adapters.alpha={a.alpha} must be positive")
        if not 0.0 <= a.dropout < 1.0:
            raise ConfigError(f"adapters.dropout={a.dropout} must lie in [0, 1)")
        if a.quantize_base != "none" and cfg.parallel.tp > 1:
            raise ConfigError(
                f"adapters.quantize_base={a.quantize_base} with parallel.tp > 1 is not supported: shard a 4-bit base "
                f"with FSDP (parallel.dp_shard) and/or pp, or keep parallel.tp with quantize_base=none"
            )
        if a.hqq_group_size < 1:
            raise ConfigError(f"adapters.hqq_group_size={a.hqq_group_size} must be at least 1")
    elif a.quantize_base != "none":
        raise ConfigError(
            f"adapters.quantize_base={a.quantize_base} quantizes the frozen base under adapters: set adapters.kind "
            f"to lora or dora (QLoRA / QDoRA), or quantize_base=none"
        )
    if cfg.training.max_norm < 0:
        raise ConfigError(f"training.max_norm={cfg.training.max_norm} must be 0 (off) or positive")


def check_batch(cfg: Config, dp_size: int) -> int:
    """Returns the number of gradient-accumulation microbatches per step."""
    local, global_ = cfg.training.local_batch_size, cfg.training.global_batch_size
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


def check_streams(cfg: Config, dp_size: int) -> None:
    if cfg.data.num_streams % dp_size:
        raise ConfigError(
            f"data.num_streams={cfg.data.num_streams} is not a multiple of the data-parallel size {dp_size}: "
            f"set data.num_streams to a multiple of {dp_size} (keep it fixed across restarts to resume exactly)"
        )


def check_seq_len(cfg: Config, max_seq_len: int) -> None:
    if cfg.training.seq_len > max_seq_len:
        raise ConfigError(
            f"training.seq_len={cfg.training.seq_len} is over the model's maximum sequence length "
            f"{max_seq_len}; lower training.seq_len or raise model.max_seq_len"
        )


def check_pipeline(cfg: Config, pp: int) -> int:
    """Returns the number of pipeline microbatches per local batch (1 without pipelining)."""
    if pp == 1:
        return 1
    p = cfg.parallel
    n = pp if p.pp_microbatches == -1 else p.pp_microbatches
    if n < 1 or cfg.training.local_batch_size % n:
        raise ConfigError(
            f"parallel.pp_microbatches={n} does not divide training.local_batch_size={cfg.training.local_batch_size}; "
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
