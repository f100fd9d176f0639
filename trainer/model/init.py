"""Parameter initialisation that gives the same weights on any number of ranks and any layout.

Each parameter is drawn whole from a generator seeded by (seed, its name), then each rank keeps its own
slice. A sharded run therefore starts from exactly the weights of a single-process run, which is what
makes parallel-vs-single parity checks exact. Only one parameter is ever whole at a time.
"""

import zlib

import torch
from torch import nn

from trainer.model.args import ModelArgs
from trainer.model.build import param_shapes
from trainer.model.family import family_of
from trainer.model.llama import Transformer
from parallel.placement import copy_full_into


class SeededInit:
    """The initial value of each parameter, whole, drawn from a generator seeded by (seed, its name)."""

    def __init__(self, args: ModelArgs, seed: int):
        self.args, self.seed, self.shapes = args, seed, param_shapes(args)
        self.names = set(self.shapes)

    def label(self, name: str) -> str:
        return f"initial value of {name}"

    def get(self, name: str) -> torch.Tensor:
        shape, std = self.shapes[name], family_of(self.args).init_std(name, self.args)
        if std is None:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(shape)
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return full


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    source = SeededInit(model.args, seed)
    for name, param in model.named_parameters():
        if name in source.names:  # adapter parameters have their own initialisation
            copy_full_into(param, source.get(name))
