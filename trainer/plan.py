"""Everything decided from the config alone, with every check that can fail on it, before any work:
the layout, the batch split, the tokenizer and the model's shape. Shared by training and --dry-run."""

from dataclasses import dataclass

from parallel.mesh import ParallelDims
from trainer.config import Config, ConfigError
from trainer.config.checks import check_batch, check_pipeline, check_seq_len, check_streams
from trainer.model.args import ModelArgs
from trainer.tokenizer import build_tokenizer
from trainer.tokenizer.base import Tokenizer


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims
    accum_steps: int  # gradient-accumulation microbatches per optimizer step
    pp_microbatches: int  # pipeline microbatches per local batch
    tokenizer: Tokenizer
    model_args: ModelArgs


def make_plan(cfg: Config, world_size: int) -> Plan:
    from trainer.model.build import resolve_model_args

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    accum_steps = check_batch(cfg, dims.dp_size)
    check_streams(cfg, dims.dp_size)
    pp_microbatches = check_pipeline(cfg, dims.pp)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model_args = resolve_model_args(cfg.model, tokenizer.vocab_size)
    check_seq_len(cfg, model_args.max_seq_len)
    dims.check_model(model_args, cfg.parallel)
    if cfg.adapters.kind != "none":
        from trainer.adapters import target_names
        from trainer.model.build import build_meta_model

        meta = build_meta_model(model_args)  # on meta: costs nothing
        names = target_names(meta, cfg.adapters.targets)
        if cfg.adapters.quantize_base != "none":
            check_quantizable_layers(meta, names, cfg.adapters, shards=dims.dp_shard)
        if cfg.adapters.quantize_base == "nf4" and dims.dp_replicate > 1 and dims.dp_shard == 1:
            # FSDP2 hands a subclass's all-gather hooks other arguments when the shard group is one rank.
            raise ConfigError(
                "adapters.quantize_base=nf4 with parallel.dp_replicate > 1 and dp_shard=1 (pure replication) is not "
                "supported by torchao's NF4 under FSDP2: shard it (parallel.dp_shard > 1, HSDP works), or use bnb_nf4 / hqq"
            )
    if (cfg.export.hf or cfg.export.peft) and dims.pp > 1 and not cfg.checkpoint.enabled:
        raise ConfigError(
            "exports with parallel.pp > 1 are assembled from the final checkpoint: set checkpoint.enabled=true"
        )
    if cfg.export.peft and cfg.adapters.kind == "none":
        raise ConfigError("export.peft writes an adapter: set adapters.kind to lora or dora (or use export.hf)")
    if cfg.parallel.async_tp and not (cfg.compile.enabled and dims.tp > 1 and _has_cuda()):
        raise ConfigError("parallel.async_tp needs CUDA, parallel.tp > 1 and compile.enabled=true")
    return Plan(dims=dims, accum_steps=accum_steps, pp_microbatches=pp_microbatches, tokenizer=tokenizer, model_args=model_args)


def check_quantizable_layers(meta, names: list[str], cfg, *, shards: int) -> None:
    from trainer.adapters.quantize import check_quantizable, missing_library

    package = missing_library(cfg.quantize_base)
    if package:
        raise ConfigError(f"adapters.quantize_base={cfg.quantize_base} needs the {package} package: pip install {package}")
    for name in names:
        problem = check_quantizable(name, meta.get_submodule(name).weight.shape, cfg.quantize_base, shards=shards, hqq_group_size=cfg.hqq_group_size)
        if problem:
            raise ConfigError(
                f"adapters.quantize_base={cfg.quantize_base}: {problem}; leave this layer out of adapters.targets, "
                f"change parallel.dp_shard, or use another quantize_base"
            )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
