"""Everything decided from the config alone, with every check that can fail on it, before any work:
the layout, the batch split, the tokenizer and the model's shape. Shared by training and --dry-run."""

import dataclasses
from dataclasses import dataclass

from torch import nn

from fp8.converter import Float8Converter
from parallel.mesh import LayoutError, ParallelDims
from trainer.config import Config, ConfigError
from trainer.config.checks import check_batch, check_pipeline, check_seq_len, check_streams
from trainer.config.schema import ModelConfig, ParallelConfig
from trainer.adapters.converter import AdapterConverter
from trainer.converters import ModelConverter, convert
from trainer.distill.teacher import check_teacher
from trainer.model.args import ModelArgs
from trainer.model.build import build_meta_model
from trainer.model.family import FAMILIES
from trainer.model.flavors import FLAVORS
from trainer.tokenizer import build_tokenizer
from trainer.tokenizer.base import Tokenizer
from trainer.weights.load import read_checkpoint_args


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims
    accum_steps: int  # gradient-accumulation microbatches per optimizer step
    pp_microbatches: int  # pipeline microbatches per local batch
    tokenizer: Tokenizer
    model_args: ModelArgs
    num_stages: int  # pipeline stages over all pipeline ranks (1 without pipelining)
    converters: list[ModelConverter]  # the model transforms, in the order they apply
    teacher_args: ModelArgs | None = None  # the distillation teacher's shape (None: no distillation)
    chunked_loss: bool = False  # the loss projects the final hidden states itself, chunk by chunk


def make_plan(cfg: Config, world_size: int) -> Plan:
    p = cfg.parallel
    try:
        dims = ParallelDims.from_sizes(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, world_size=world_size)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    accum_steps = check_batch(cfg, dims.dp_size)
    check_streams(cfg, dims.dp_size)
    pp_microbatches = check_pipeline(cfg, dims.pp)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model_args = resolve_model_args(cfg.model, tokenizer.vocab_size)
    check_seq_len(cfg, model_args.max_seq_len)
    check_layout_fits_model(dims, model_args, cfg.parallel)
    converters = build_converters(cfg)
    if converters:
        meta = build_meta_model(model_args)  # on meta: costs nothing
        for converter in converters:
            converter.check(meta, dims)  # each sees the model as the converters before it left it
            converter.convert(meta)
    teacher_args = check_teacher(cfg, dims, model_args)
    chunked_loss = decide_chunked_loss(cfg, dims, model_args, converters)
    if (cfg.export.hf or cfg.export.peft) and dims.pp > 1 and not cfg.checkpoint.enabled:
        raise ConfigError(
            "exports with parallel.pp > 1 are assembled from the final checkpoint: set checkpoint.enabled=true"
        )
    if cfg.parallel.async_tp and not (cfg.compile.enabled and dims.tp > 1 and _has_cuda()):
        raise ConfigError("parallel.async_tp needs CUDA, parallel.tp > 1 and compile.enabled=true")
    return Plan(dims=dims, accum_steps=accum_steps, pp_microbatches=pp_microbatches, tokenizer=tokenizer,
                model_args=model_args, num_stages=dims.num_stages(stages_per_rank(cfg.parallel)), converters=converters,
                teacher_args=teacher_args, chunked_loss=chunked_loss)


# Every converter, in the order they apply to a model: adapters wrap the float8 layers.
CONVERTERS = (Float8Converter, AdapterConverter)


def build_converters(cfg: Config) -> list[ModelConverter]:
    """The converters the config asks for, in the order they apply."""
    return [c for c in (kind.from_config(cfg) for kind in CONVERTERS) if c is not None]


def decide_chunked_loss(cfg: Config, dims: ParallelDims, args: ModelArgs, converters: list[ModelConverter]) -> bool:
    """Whether the loss projects onto the vocabulary itself (training.chunked_loss); `always` where it
    cannot apply is an error saying why."""
    why_not = None
    if dims.tp > 1:
        why_not = "tensor parallelism computes the loss over vocabulary-sharded logits (parallel.loss_parallel) or replicated ones"
    elif cfg.distill.teacher is not None:
        why_not = "distillation compares the student's logits with the teacher's in chunks of its own (distill.chunk_tokens)"
    elif not isinstance(convert(build_meta_model(args), converters).output, (nn.Linear, type(None))):
        why_not = "the output layer carries an adapter (adapters.targets includes output)"
    if why_not and cfg.training.chunked_loss == "always":
        raise ConfigError(f"training.chunked_loss=always cannot apply here: {why_not}; use auto or never")
    return why_not is None and cfg.training.chunked_loss != "never"


def stages_per_rank(cfg: ParallelConfig) -> int:
    return cfg.pp_stages_per_rank if cfg.pp_schedule == "interleaved_1f1b" else 1


def check_layout_fits_model(dims: ParallelDims, args: ModelArgs, cfg: ParallelConfig) -> None:
    """Layout constraints that depend on the model's shape."""
    if dims.tp > 1:
        for name in ("n_heads", "n_kv_heads"):
            if getattr(args, name) % dims.tp:
                raise ConfigError(
                    f"parallel.tp={dims.tp} does not divide the model's {name}={getattr(args, name)}; "
                    f"pick a tp that divides both n_heads={args.n_heads} and n_kv_heads={args.n_kv_heads}"
                )
        if args.hidden_dim % dims.tp:
            raise ConfigError(f"parallel.tp={dims.tp} does not divide the model's MLP hidden size {args.hidden_dim}")
        if cfg.loss_parallel and args.vocab_size % dims.tp:
            raise ConfigError(
                f"parallel.loss_parallel shards the vocabulary ({args.vocab_size}) over tp={dims.tp}, which does "
                f"not divide it; set model.vocab_size to a multiple of {dims.tp} or parallel.loss_parallel=false"
            )
    if args.tie_embeddings and (dims.tp > 1 or dims.pp > 1):
        raise ConfigError(
            "tied embeddings (model.tie_embeddings) cannot be split by tensor or pipeline parallelism; "
            "use parallel.tp=1 and parallel.pp=1 for this model, or untie them"
        )
    stages = dims.num_stages(stages_per_rank(cfg))
    if stages > args.n_layers:
        raise ConfigError(
            f"parallel.pp={dims.pp} with {stages // dims.pp} stage(s) per rank makes {stages} pipeline stages, "
            f"more than the model's {args.n_layers} layers"
        )


_OVERRIDABLE = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "max_seq_len", "rope_theta",
    "norm_eps", "tie_embeddings",
)


def resolve_model_args(cfg: ModelConfig, tokenizer_vocab_size: int) -> ModelArgs:
    """The model's shape: a flavor (or the checkpoint's own shape), then the single-field overrides."""
    overrides = {k: getattr(cfg, k) for k in _OVERRIDABLE if getattr(cfg, k) is not None}
    if cfg.init_from is not None and cfg.flavor is None:
        args = read_checkpoint_args(cfg.init_from)
        if overrides:
            raise ConfigError(
                f"model.{next(iter(overrides))} cannot be set with model.init_from: the shape comes from the checkpoint"
            )
    else:
        flavor = cfg.flavor or "debug"
        if flavor not in FLAVORS:
            by_family = "; ".join(f"{', '.join(f.flavors)} ({f.name})" for f in FAMILIES.values())
            raise ConfigError(f"model.flavor={flavor!r} is not one of: {by_family}")
        fields = dict(FLAVORS[flavor], **overrides)
        if fields.get("vocab_size", -1) == -1:
            # Padded to a multiple of 64 so that it splits evenly over any TP degree up to 64 (and
            # matmul tiles stay whole); the extra rows are never a label and quickly learn to lose.
            fields["vocab_size"] = -(-tokenizer_vocab_size // 64) * 64
        try:
            args = ModelArgs(**fields)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.init_from is not None:
            ckpt = read_checkpoint_args(cfg.init_from)
            if ckpt != args:
                diff = next(f.name for f in dataclasses.fields(ModelArgs) if getattr(ckpt, f.name) != getattr(args, f.name))
                raise ConfigError(
                    f"model.init_from={cfg.init_from} has {diff}={getattr(ckpt, diff)}, but model.flavor={flavor} "
                    f"gives {getattr(args, diff)}; drop model.flavor to take the checkpoint's shape"
                )
    if args.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocab_size is {args.vocab_size}; "
            f"use the model's own tokenizer or raise model.vocab_size"
        )
    return args


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
