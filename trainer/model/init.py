"""Parameter initialisation that gives the same weights on any number of ranks and any layout.

Each parameter is drawn whole from a generator seeded by (seed, its name), then each rank keeps its own
slice. A sharded run therefore starts from exactly the weights of a single-process run, which is what
makes parallel-vs-single parity checks exact. Only one parameter is ever whole at a time.
"""

import math
import zlib

import torch
from torch import nn

from trainer.model.llama import Transformer
from trainer.weights.placement import copy_full_into


def init_std(name: str, model: Transformer) -> float | None:
    """The init std of a parameter; None means "fill with ones" (norm weights)."""
    args = model.args
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        # Residual-branch outputs shrink with depth so the residual stream's variance stays bounded.
        return 0.02 / math.sqrt(2 * args.n_layers)
    if name == "output.weight" or (name == "tok_embeddings.weight" and args.tie_embeddings):
        return args.dim**-0.5
    return 0.02


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    device = model.rope_cos.device
    for name, param in model.named_parameters():
        std = init_std(name, model)
        if std is None:
            full = torch.ones(param.shape)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(param.shape)
            nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        copy_full_into(param, full.to(device))
