"""An adapter run's model as it trained, in one process: for evaluation, sampling and checks.

The base comes from the run's `model.init_from` (or its seeded init), 4-bit if the run quantized it,
and the adapters from one of the run's checkpoints (adapter runs checkpoint only the adapters).
"""

from pathlib import Path

import torch

from trainer.adapters import apply_adapters, materialize_unit
from trainer.checkpoint.paths import checkpoint_root, complete_steps, step_dir
from trainer.checkpoint.safe_reader import load_safely
from trainer.checkpoint.state import ModelState
from trainer.config import Config, load_config
from trainer.config.schema import AdaptersConfig
from trainer.model.build import build_meta_model
from trainer.model.llama import Transformer
from trainer.weights.dcp_import import read_dcp_args
from trainer.weights.errors import CheckpointError
from trainer.weights.load import open_weights


def build_adapted(args, cfg: AdaptersConfig, init_from: str | Path | None, seed: int, device: str = "cpu") -> Transformer:
    """A whole model with fresh adapters over its base, materialized unit by unit as the trainer does
    without FSDP (so a 4-bit base is never whole in high precision)."""
    model = build_meta_model(args)
    apply_adapters(model, cfg)
    weights = open_weights(init_from, args, seed)
    for layer_id, block in model.layers.items():
        materialize_unit(block, f"layers.{layer_id}", device=torch.device(device), weights=weights, cfg=cfg, shards=1, seed=seed)
    materialize_unit(model, "", device=torch.device(device), weights=weights, cfg=cfg, shards=1, seed=seed)
    return model


def load_adapter_run(run_dir: str | Path, step: int | None = None, device: str = "cpu") -> Transformer:
    """The model of the adapter run in `run_dir` at checkpoint `step` (default: the latest), in eval mode."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.adapters.kind == "none":
        raise CheckpointError(f"{run_dir}: not an adapter run (adapters.kind=none): load its export or checkpoint directly")
    root = checkpoint_root(run_dir)
    steps = complete_steps(root)
    if not steps:
        raise CheckpointError(f"{root}: no complete checkpoint to take the adapters from")
    if step is not None and step not in steps:
        raise CheckpointError(f"{root}: no complete checkpoint of step {step} (there are: {', '.join(map(str, steps))})")
    return load_adapters(cfg, step_dir(root, steps[-1] if step is None else step), device)


def load_adapters(cfg: Config, path: Path, device: str = "cpu") -> Transformer:
    """The model of an adapter run with this config, its adapters from the checkpoint at `path`, in eval mode."""
    model = build_adapted(read_dcp_args(path), cfg.adapters, cfg.model.init_from, cfg.job.seed, device)
    load_safely({"model": ModelState([model], "trainable")}, path, no_dist=True, what=f"{path}: cannot load its adapters")
    return model.eval()
