"""Parameter initialisation that gives the same weights on any number of ranks and any layout.

Each parameter is drawn whole from a generator seeded by (seed, its name), then each rank keeps its own
slice. A sharded run therefore starts from exactly the weights of a single-process run, which is what
makes parallel-vs-single parity checks exact. Only one parameter is ever whole at a time.

The draw happens on the device the run trains on: CPU generators draw one value at a time on one core
(about 10 minutes for an 8B model), a CUDA generator draws the same 8B in seconds. So a GPU run starts
from the same weights on any number of GPUs and any layout, but not from the numbers a CPU run draws.
"""

import zlib

import torch
from torch import nn

from models import DecoderArgs, family_of


class SeededInit:
    """The initial value of each parameter, whole, drawn from a generator seeded by (seed, its name): a
    weight source like a checkpoint's (names, get(name), label(name))."""

    def __init__(self, args: DecoderArgs, seed: int, shapes: dict[str, torch.Size], device: torch.device | str = "cpu"):
        self.args, self.seed, self.shapes, self.device = args, seed, shapes, torch.device(device)
        self.names = set(shapes)

    def label(self, name: str) -> str:
        return f"initial value of {name}"

    def get(self, name: str) -> torch.Tensor:
        shape, std = self.shapes[name], family_of(self.args).init_std(name, self.args)
        if std is None:
            return torch.ones(shape, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(shape, device=self.device)
        nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return full
