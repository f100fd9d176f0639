"""Everything decided from the config alone, once per start, with every check that can fail on it, before
any work: the layout, the batch split, the tokenizer, the model's shape and family, the converters, and
the converted model on the meta device (built once: the trainer materializes this very object).
--check, --dry-run and training all read the same Plan."""

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from models import FAMILIES, Decoder, DecoderArgs, ModelFamily, build_meta_model, family_of, find_flavor
from parallel.mesh import LayoutError, ParallelDims
from trainer.config import Config, ConfigError
from trainer.config.checks import check_batch, check_pipeline, check_seq_len, check_streams
from trainer.config.schema import DataConfig, ModelConfig, ParallelConfig, TokenizerConfig
from trainer.converters import ConverterInfo, ModelConverter, build_converters
from trainer.data import check_enough_tokens, load_documents
from trainer.data.held_out import check_eval_tokens, training_and_eval_documents
from trainer.distill.teacher import check_teacher
from trainer.expert_balance import check_moe_settings
from trainer.fault.inject import parse_fault
from trainer.tokenizer import build_tokenizer
from trainer.tokenizer.base import Tokenizer
from trainer.tokenizer.identity import describe as describe_tokenizer, fingerprint
from trainer.weights.load import read_checkpoint_args


@dataclass(frozen=True)
class Plan:
    cfg: Config
    dims: ParallelDims
    accum_steps: int  # gradient-accumulation microbatches per optimizer step
    pp_microbatches: int  # pipeline microbatches per local batch
    num_stages: int  # pipeline stages over all pipeline ranks (1 without pipelining)
    tokenizer: Tokenizer
    family: ModelFamily
    model_args: DecoderArgs
    base_shapes: dict[str, torch.Size]  # the parameters of the unconverted model: what weights fill
    meta: Decoder  # the converted model on the meta device
    converters: list[ModelConverter]  # the model transforms, in the order they applied
    info: ConverterInfo  # their answers about `meta`, combined
    param_counts: dict[str, int]  # of the converted model: total, trainable, non_embedding
    teacher_args: DecoderArgs | None = None  # the distillation teacher's shape (None: no distillation)
    chunked_loss: bool = False  # the loss projects the final hidden states itself, chunk by chunk
    attention: str = "causal"  # data.attention resolved: causal or document
    attention_kernel: str = "sdpa"  # for document masks and cp: sdpa, or flex (CUDA with compile on)

    @property
    def trainable_only(self) -> bool:
        """Checkpoints hold only the trainable parameters (a converter rebuilds the rest at every start)."""
        return any(c.checkpoints_trainable_only for c in self.converters)


def make_plan(cfg: Config, world_size: int) -> Plan:
    p = cfg.parallel
    try:
        dims = ParallelDims.from_sizes(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, cp=p.cp,
                                       ep=p.ep, world_size=world_size)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    accum_steps = check_batch(cfg.training, dims.dp_size)
    for fault in map(parse_fault, cfg.fault.inject):
        if fault.rank >= world_size:
            raise ConfigError(f"fault.inject: rank {fault.rank} does not exist in a world of {world_size} rank(s)")
    check_streams(cfg.data, dims.dp_size * cfg.fault.replica_groups)  # every group reads its own share
    pp_microbatches = check_pipeline(cfg.parallel, cfg.training, dims.pp)
    tokenizer = build_tokenizer(cfg.tokenizer)
    model_args = resolve_model_args(cfg.model, tokenizer.vocab_size)
    check_seq_len(cfg.training, model_args.max_seq_len)
    check_context_parallel(dims, cfg.training.seq_len)
    family = family_of(model_args)
    check_layout_fits_model(dims, model_args, cfg.parallel)
    why = check_moe_settings(cfg.moe, model_args, dims, compiled=cfg.compile.enabled)
    if why is not None:
        raise ConfigError(why)
    converters = build_converters(cfg)
    meta = build_meta_model(model_args)  # on meta: costs nothing
    base_shapes = {name: p.shape for name, p in meta.named_parameters()}
    infos = []
    for converter in converters:  # each sees, checks and reports the model as the ones before it left it
        converter.convert(meta, dims)
        infos.append(converter.info(meta))
    teacher_args = check_teacher(cfg.distill, cfg.adapters.hqq_group_size, cfg.training.seq_len, dims, model_args)
    chunked_loss = decide_chunked_loss(cfg.training.chunked_loss, dims, meta, distilling=teacher_args is not None)
    if (cfg.export.hf or cfg.export.peft) and dims.pp > 1 and not cfg.checkpoint.enabled:
        raise ConfigError(
            "exports with parallel.pp > 1 are assembled from the final checkpoint: set checkpoint.enabled=true"
        )
    if cfg.export.hf or cfg.export.peft:
        try:
            family.hf.config(model_args, dtype=torch.float32)
        except ValueError as e:
            raise ConfigError(f"export.hf / export.peft: {e}; set them to false (checkpoints keep the model)") from None
    if cfg.parallel.async_tp and not (cfg.compile.enabled and dims.tp > 1 and torch.cuda.is_available()):
        raise ConfigError("parallel.async_tp needs CUDA, parallel.tp > 1 and compile.enabled=true")
    attention = cfg.data.attention
    if attention == "auto":
        attention = "document" if cfg.data.task == "sft" else "causal"
    check_blocks_take_masks(meta, family.name, attention, dims.cp)
    # FlexAttention is fast only compiled, and has no backward on CPU; SDPA's boolean mask (or, for causal
    # cp chunks on CPU, no mask at all) serves elsewhere.
    masked = attention == "document" or dims.cp > 1
    kernel = "flex" if masked and cfg.compile.enabled and torch.cuda.is_available() else "sdpa"
    return Plan(cfg=cfg, dims=dims, accum_steps=accum_steps, pp_microbatches=pp_microbatches,
                num_stages=dims.num_stages(stages_per_rank(cfg.parallel)), tokenizer=tokenizer, family=family,
                model_args=model_args, base_shapes=base_shapes, meta=meta, converters=converters,
                info=ConverterInfo.combine(infos), param_counts=count_params(meta), teacher_args=teacher_args, chunked_loss=chunked_loss,
                attention=attention, attention_kernel=kernel)


def count_params(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "non_embedding": total - model.tok_embeddings.weight.numel()}


def load_data(plan: Plan):
    """(training documents, held-out documents or None), read and checked against the plan: the one place
    a start reads its data (--check and training alike)."""
    cfg = plan.cfg
    docs, held_out = training_and_eval_documents(cfg.data, cfg.eval, load_documents)
    check_prepared(docs, held_out, plan.tokenizer, cfg.tokenizer, cfg.data)
    check_enough_tokens(docs, plan.tokenizer, cfg.data, cfg.training.seq_len)
    if held_out is not None:
        check_eval_tokens(held_out, plan.tokenizer, cfg.data, cfg.training.seq_len)
    for c in getattr(docs, "components", []):  # a mixture: each source's own held-out documents
        if c.name in docs.held_out:
            check_eval_tokens(docs.held_out[c.name], plan.tokenizer, c.cfg, cfg.training.seq_len)
    return docs, held_out


def check_prepared(docs, held_out, tokenizer, tokenizer_cfg: TokenizerConfig, data: DataConfig) -> None:
    """Prepared token shards were made with this run's tokenizer and token settings (one line if not)."""
    every = [docs, held_out, *[c.docs for c in getattr(docs, "components", [])], *getattr(docs, "held_out", {}).values()]
    for d in every:
        source = getattr(d, "docs", d)  # a held-out share of a source is checked as its source
        if getattr(source, "prepared", False):
            source.check_matches(fingerprint(tokenizer), describe_tokenizer(tokenizer_cfg), data)


def decide_chunked_loss(setting: str, dims: ParallelDims, meta: nn.Module, *, distilling: bool) -> bool:
    """Whether the loss projects onto the vocabulary itself (training.chunked_loss); `always` where it
    cannot apply is an error saying why."""
    why_not = None
    if dims.tp > 1:
        why_not = "tensor parallelism computes the loss over vocabulary-sharded logits (parallel.loss_parallel) or replicated ones"
    elif distilling:
        why_not = "distillation compares the student's logits with the teacher's in chunks of its own (distill.chunk_tokens)"
    elif meta.output is not None and type(meta.output) is not nn.Linear:
        # The chunked loss multiplies by the head's weight itself, which only a plain layer allows.
        why_not = (f"the output layer computes its own way ({type(meta.output).__name__}: an adapter through "
                   f"adapters.targets, or QAT's rounding through qat.head)")
    if why_not and setting == "always":
        raise ConfigError(f"training.chunked_loss=always cannot apply here: {why_not}; use auto or never")
    return why_not is None and setting != "never"


@functools.cache
def _forward_takes_mask(block_type: type) -> bool:
    return "mask" in inspect.signature(block_type.forward).parameters


def check_blocks_take_masks(meta: nn.Module, family: str, attention: str, cp: int) -> None:
    """Document attention and context parallelism hand each block a WindowMask (models/common/masking.py)."""
    if attention == "causal" and cp == 1:
        return
    if not _forward_takes_mask(type(next(iter(meta.layers.values())))):
        what = "data.attention=document" if attention == "document" else f"parallel.cp={cp}"
        raise ConfigError(f"{what} needs attention masks, which the {family} family's blocks do not take (no mask= "
                          f"keyword, docs/architecture.md); use data.attention=causal and parallel.cp=1 with this model")


def check_context_parallel(dims: ParallelDims, seq_len: int) -> None:
    """cp ranks hold 2 chunks each of every sequence: seq_len must cut into 2 x cp equal chunks."""
    if dims.cp > 1 and seq_len % (2 * dims.cp):
        fit = seq_len - seq_len % (2 * dims.cp)
        raise ConfigError(
            f"training.seq_len={seq_len} does not split into 2 x parallel.cp = {2 * dims.cp} equal chunks (each cp rank "
            f"holds two, for load balance); use a multiple of {2 * dims.cp}, e.g. {fit or 2 * dims.cp}"
        )


def stages_per_rank(cfg: ParallelConfig) -> int:
    return cfg.pp_stages_per_rank if cfg.pp_schedule == "interleaved_1f1b" else 1


def check_layout_fits_model(dims: ParallelDims, args: DecoderArgs, cfg: ParallelConfig) -> None:
    """Layout constraints that depend on the model's shape."""
    why = family_of(args).check_layout(args, dims)
    if why is not None:
        raise ConfigError(why)
    if dims.ep > 1 and not hasattr(args, "num_experts"):
        raise ConfigError(f"parallel.ep={dims.ep} splits a model's experts, and the {args.family} model has none: "
                          f"set parallel.ep=1")
    if dims.tp > 1:
        sizes = family_of(args).tp_sizes(args)
        for name, size in sizes.items():
            if size % dims.tp:
                heads = " and ".join(f"{k}={v}" for k, v in sizes.items() if k.startswith("n_"))
                hint = f"pick a tp that divides {heads}" if name.startswith("n_") else "pick a tp that divides it"
                raise ConfigError(f"parallel.tp={dims.tp} does not divide the model's {name}={size}; {hint}")
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
    "norm_eps", "tie_embeddings", "num_experts", "top_k", "moe_hidden_dim",
)


def resolve_model_args(cfg: ModelConfig, tokenizer_vocab_size: int) -> DecoderArgs:
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
        found = find_flavor(flavor)
        if found is None:
            by_family = "; ".join(f"{', '.join(f.flavors)} ({f.name})" for f in FAMILIES.values())
            raise ConfigError(f"model.flavor={flavor!r} is not one of: {by_family}")
        family, fields = found
        unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(family.args)}]
        if unknown:
            raise ConfigError(f"model.{unknown[0]} is not a field of the {family.name} family's shape: remove it")
        fields = dict(fields, **overrides)
        if fields.get("vocab_size", -1) == -1:
            # Padded to a multiple of 64 so that it splits evenly over any TP degree up to 64 (and
            # matmul tiles stay whole); the extra rows are never a label and quickly learn to lose.
            fields["vocab_size"] = -(-tokenizer_vocab_size // 64) * 64
        try:
            args = family.args(**fields)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.init_from is not None:
            _check_same_shape(read_checkpoint_args(cfg.init_from), args, cfg.init_from, flavor)
    if args.vocab_size < tokenizer_vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer_vocab_size} tokens but the model's vocab_size is {args.vocab_size}; "
            f"use the model's own tokenizer or raise model.vocab_size"
        )
    return args


def _check_same_shape(ckpt: DecoderArgs, args: DecoderArgs, init_from: str, flavor: str) -> None:
    if ckpt == args:
        return
    fix = "set model.flavor=null to take the checkpoint's shape"
    if ckpt.family != args.family:
        raise ConfigError(f"model.init_from={init_from} is a {ckpt.family} model, but model.flavor={flavor} is "
                          f"{args.family}; {fix}")
    diff = next(f.name for f in dataclasses.fields(args) if getattr(ckpt, f.name) != getattr(args, f.name))
    raise ConfigError(f"model.init_from={init_from} has {diff}={getattr(ckpt, diff)}, but model.flavor={flavor} "
                      f"gives {getattr(args, diff)}; {fix}")
