"""model.init_from=<one of our checkpoints/step-N directories>: the weights only, into any layout."""

from pathlib import Path

import torch
import torch.distributed as dist

from models import Decoder, DecoderArgs, args_from_json
from trainer.checkpoint.safe_reader import load_safely
from trainer.checkpoint.state import ModelState
from trainer.weights.errors import CheckpointError


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_dcp_args(path: Path) -> DecoderArgs:
    entry = {"model_args": {"json": ""}}
    # no_dist: every rank reads this small entry on its own, before any process group work.
    load_safely(entry, path, no_dist=True, what=f"{path}: cannot read the model shape from this checkpoint")
    try:
        return args_from_json(entry["model_args"]["json"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: its model shape cannot be read ({e})") from None


class DCPWeights:
    """Base tensors of a checkpoint one at a time, whole, on each rank independently (adapter runs load
    and quantize their base block by block as the tensors arrive)."""

    def __init__(self, path: Path, args: DecoderArgs, shapes: dict[str, torch.Size]):
        saved = read_dcp_args(path)
        if saved != args:
            raise CheckpointError(f"{path}: the checkpoint's shape {saved} differs from the model's {args}")
        self.path, self.shapes = path, shapes
        self.names = set(self.shapes)

    def label(self, name: str) -> str:
        return f"{self.path}: tensor model.{name}"

    def get(self, name: str) -> torch.Tensor:
        entry = {"model": {name: torch.empty(self.shapes[name])}}
        load_safely(entry, self.path, no_dist=True, what=f"{self.label(name)}: cannot load it")
        return entry["model"][name]


def load_dcp_weights(model: Decoder, path: Path) -> None:
    load_safely({"model": ModelState([model], "all")}, path, no_dist=not dist.is_initialized(),
                what=f"{path}: cannot load the model weights")
