"""`model.init_from`: detect the checkpoint format from the path, read its shape, load its weights."""

from pathlib import Path

import torch

from models import Decoder, DecoderArgs, build_meta_model
from trainer.weights.dcp_import import DCPWeights, is_dcp_dir, load_dcp_weights, read_dcp_args
from trainer.weights.errors import CheckpointError
from trainer.weights.hf_import import HFWeights, is_hf_dir, read_hf_args
from trainer.weights.llama2c import Llama2cWeights, looks_like_llama2c, read_llama2c_args
from trainer.weights.placement import fill_from
from trainer.weights.seeded_init import SeededInit


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model.init_from: no such file or directory: {path}")
    if is_hf_dir(path):
        return "hf"
    if is_dcp_dir(path):
        return "dcp"
    if looks_like_llama2c(path):
        return "llama2c"
    raise CheckpointError(
        f"model.init_from: cannot tell the format of {path}: expected a Hugging Face directory "
        f"(config.json + *.safetensors), one of our checkpoints/step-N directories, or a llama2.c .bin file"
    )


def read_checkpoint_args(path: str | Path) -> DecoderArgs:
    readers = {"hf": read_hf_args, "dcp": read_dcp_args, "llama2c": read_llama2c_args}
    return readers[detect_format(path)](Path(path))


def open_weights(path: str | Path | None, args: DecoderArgs, seed: int, shapes: dict[str, torch.Size],
                 device: torch.device | str = "cpu"):
    """The base weights one whole tensor at a time (`get(name)`): from `model.init_from`, or the seeded
    initialisation (drawn on `device`) when there is none. `shapes`: the parameters of the (unconverted)
    model to fill."""
    if path is None:
        return SeededInit(args, seed, shapes, device)
    sources = {"hf": HFWeights, "dcp": DCPWeights, "llama2c": Llama2cWeights}
    return sources[detect_format(path)](Path(path), args, shapes)


def load_weights(model: Decoder, path: str | Path) -> None:
    """Fills every parameter of a whole model (possibly sharded) from a checkpoint: ours in one DCP load,
    the others one tensor at a time."""
    if detect_format(path) == "dcp":
        return load_dcp_weights(model, Path(path))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    fill_from(model, open_weights(path, model.args, seed=0, shapes=shapes))


def load_model(path: str | Path, device: str = "cpu") -> Decoder:
    """A whole model on one device from a checkpoint, in eval mode: for evaluation, examples and checks.
    A quantized export of ours loads as the served model computes: its weights dequantized, its inputs
    rounded where the scheme rounds them."""
    model = build_meta_model(read_checkpoint_args(path))
    model.to_empty(device=device)
    model.init_buffers()
    if detect_format(path) != "hf":
        load_weights(model, path)
        return model.eval()
    weights = open_weights(path, model.args, seed=0, shapes={name: p.shape for name, p in model.named_parameters()})
    fill_from(model, weights)
    if weights.format is not None:
        from trainer.qat.export import serve_rounding

        serve_rounding(model, weights.served, weights.format, weights.group_size)
    return model.eval()
