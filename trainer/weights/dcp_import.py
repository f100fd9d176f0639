"""model.init_from=<one of our checkpoints/step-N directories>: the weights only, into any layout."""

from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.safe_reader import SafeFileSystemReader
from trainer.checkpoint.state import LOAD_ERRORS, ModelState, SafeLoadPlanner, model_args_from_entry
from trainer.model.args import ModelArgs
from trainer.model.llama import Transformer
from trainer.weights.hf_import import CheckpointError


def _has_adapters(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def read_dcp_args(path: Path) -> ModelArgs:
    entry = {"model_args": {"json": ""}}
    try:
        # no_dist: every rank reads this small entry on its own, before any process group work.
        dcp.load(entry, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot read the model shape from this checkpoint ({' '.join(str(e).split())[:300]})") from None
    return model_args_from_entry(entry["model_args"])


def load_dcp_weights(model: Transformer, path: Path) -> None:
    try:
        dcp.load(
            # "frozen": with adapters on, the checkpoint gives the base and the adapters start fresh.
            {"model": ModelState([model], "frozen" if _has_adapters(model) else "all")}, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
            no_dist=not dist.is_initialized(),
        )
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{path}: cannot load the model weights ({' '.join(str(e).split())[:300]})") from None
