"""A model on the meta device from its ModelArgs, its parameter counts and its FLOPs per token."""

import torch

from trainer.model.args import ModelArgs
from trainer.model.family import family_of
from trainer.model.llama import Transformer

def build_meta_model(args: ModelArgs) -> Transformer:
    """The model of args' family (a Transformer or a subclass), on the meta device."""
    with torch.device("meta"):
        return family_of(args).model(args)


def param_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Name -> shape of every parameter of the whole model (a pipeline stage holds only some of them),
    without allocating anything."""
    return {name: p.shape for name, p in build_meta_model(args).named_parameters()}


def count_params(model: Transformer) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.tok_embeddings.weight.numel()
    return {"total": total, "trainable": trainable, "non_embedding": total - embedding}


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs per token of the model (its family's count)."""
    return family_of(args).flops_per_token(args, seq_len)
