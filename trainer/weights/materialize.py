"""The one way a model leaves the meta device: unit by unit (each block, then the root's own modules),
each allocated and filled from a weight source just before FSDP shards it (or in that order without
FSDP). No rank ever holds more than one block whole, whatever the weights come from."""

import torch
from torch import nn

from models.common.decoder import init_block_buffers
from trainer.weights.placement import fill_from


def materialize_unit(unit: nn.Module, unit_name: str, *, device: torch.device, weights) -> list[tuple[str, nn.Module]]:
    """Allocates `unit` on `device` and copies its base parameters from `weights` (a source with
    names / get(name) / label(name), see trainer/weights/load.py: open_weights). A block's unit_name is
    "layers.N"; the root's is "", and it brings only the root's own modules and buffers (RoPE tables).
    Returns the (whole-model name, module) pieces filled, for converters to finish (cast, quantize, init)."""
    if unit_name:
        pieces = [(unit_name, unit)]
    else:
        pieces = [(name, child) for name, child in unit.named_children() if name != "layers"]
        unit.to_empty(device=device, recurse=False)
        unit.init_buffers()
    for piece_name, piece in pieces:
        piece.to_empty(device=device)
        init_block_buffers(piece)
        fill_from(piece, weights, prefix=f"{piece_name}.")
    return pieces
