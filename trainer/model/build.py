"""From the `model` config section to ModelArgs and a model on the meta device."""

import dataclasses

import torch

from trainer.config import ConfigError
from trainer.config.schema import ModelConfig
from trainer.model.args import ModelArgs
from trainer.model.flavors import FLAVORS
from trainer.model.llama import Transformer
from trainer.weights.load import read_checkpoint_args

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
            raise ConfigError(f"model.flavor={flavor!r} is not one of: {', '.join(FLAVORS)}")
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


def build_meta_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def count_params(model: Transformer) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.tok_embeddings.weight.numel()
    return {"total": total, "trainable": trainable, "non_embedding": total - embedding}


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token: 6 x (parameters used in matmuls) + 12 x layers x dim x seq_len (attention).

    The embedding lookup is no matmul, so it is left out; the output projection is one, so it counts
    even when it shares its weight with the embedding.
    """
    per_layer = (
        2 * args.dim * args.n_heads * args.head_dim
        + 2 * args.dim * args.n_kv_heads * args.head_dim
        + 3 * args.dim * args.hidden_dim
        + 2 * args.dim
    )
    matmul_params = args.n_layers * per_layer + args.dim + args.vocab_size * args.dim
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len
