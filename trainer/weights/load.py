"""`model.init_from`: detect the checkpoint format from the path, read its shape, load its weights."""

from pathlib import Path

from trainer.model.args import ModelArgs
from trainer.model.llama import Transformer
from trainer.model.init import SeededInit
from trainer.weights.dcp_import import DCPWeights, is_dcp_dir, load_dcp_weights, read_dcp_args
from trainer.weights.errors import CheckpointError
from trainer.weights.hf_import import HFWeights, is_hf_dir, load_hf_weights, read_hf_args
from trainer.weights.llama2c import Llama2cWeights, load_llama2c_weights, looks_like_llama2c, read_llama2c_args


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


def read_checkpoint_args(path: str | Path) -> ModelArgs:
    readers = {"hf": read_hf_args, "dcp": read_dcp_args, "llama2c": read_llama2c_args}
    return readers[detect_format(path)](Path(path))


def load_weights(model: Transformer, path: str | Path) -> None:
    loaders = {"hf": load_hf_weights, "dcp": load_dcp_weights, "llama2c": load_llama2c_weights}
    loaders[detect_format(path)](model, Path(path))


def open_weights(path: str | Path | None, args: ModelArgs, seed: int):
    """The base weights one whole tensor at a time (`get(name)`): from `model.init_from`, or the seeded
    initialisation when there is none."""
    if path is None:
        return SeededInit(args, seed)
    sources = {"hf": HFWeights, "dcp": DCPWeights, "llama2c": Llama2cWeights}
    return sources[detect_format(path)](Path(path), args)


def load_model(path: str | Path, device: str = "cpu") -> Transformer:
    """A whole model on one device from a checkpoint, in eval mode: for evaluation, examples and checks."""
    from trainer.model.build import build_meta_model

    model = build_meta_model(read_checkpoint_args(path))
    model.to_empty(device=device)
    model.init_buffers()
    load_weights(model, path)
    return model.eval()
