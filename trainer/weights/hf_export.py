"""Writing the model as a Hugging Face checkpoint of its family (its config.json and parameter names come
from the family's entry): config.json + safetensors, from a live model or from one of our checkpoints."""

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from models import Decoder, DecoderArgs, build_meta_model, family_of
from parallel.placement import gather_full
from trainer.weights.dcp_import import DCPWeights, read_dcp_args
from trainer.weights.files import readable


# (our name, Hugging Face name, whole tensor) -> the entries to store instead, or None to store it as is.
Quantize = Callable[[str, str, torch.Tensor], dict[str, torch.Tensor] | None]


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], args: DecoderArgs, out_dir: Path, dtype: torch.dtype,
    max_shard_bytes: int = 5 * 2**30, bos_id: int | None = None, eos_id: int | None = None,
    quantize: Quantize | None = None, quantization_config: dict | None = None,
) -> None:
    """Writes (our name, whole tensor) pairs as a Hugging Face checkpoint. Shards are written as soon as
    they fill (under temporary names, since the final names carry the shard count), so at most one
    shard is held in CPU memory. `quantize` and `quantization_config` make it a quantized checkpoint
    (trainer/qat/export.py): the tensors it replaces, and the scheme in config.json."""
    out_dir = Path(out_dir)
    hf = family_of(args).hf
    config = hf.config(args, dtype=dtype, bos_id=bos_id, eos_id=eos_id)  # first: it refuses shapes HF cannot hold
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        part = out_dir / f".part-{len(written):05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        written.append((part, list(shard), shard_bytes))
        shard, shard_bytes = {}, 0

    for name, full in tensors:
        for hf_name, piece in hf.hf_tensors(name, full):
            stored = quantize(name, hf_name, piece) if quantize is not None else None
            for key, tensor in (stored or {hf_name: piece.to(dtype=dtype)}).items():
                tensor = tensor.to(device="cpu").contiguous()
                nbytes = tensor.numel() * tensor.element_size()
                if shard and shard_bytes + nbytes > max_shard_bytes:
                    flush()
                shard[key] = tensor
                shard_bytes += nbytes
    flush()
    count = len(written)
    weight_map = {}
    for i, (part, keys, _) in enumerate(written):
        file_name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        part.rename(out_dir / file_name)
        readable(out_dir / file_name)
        weight_map.update({key: file_name for key in keys})
    if count > 1:
        index = {"metadata": {"total_size": sum(size for _, _, size in written)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


@torch.no_grad()
def export_hf(
    model: Decoder, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None, **kwargs,
) -> None:
    """From a live model in any layout without pipeline stages: each parameter is gathered whole in
    turn (all ranks take part) and rank 0 writes it, so no rank holds the whole model on its accelerator.
    `tensors` replaces the model's own parameters (e.g. with adapters merged in)."""
    gathered = tensors if tensors is not None else ((name, gather_full(p)) for name, p in model.named_parameters())
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_hf(gathered, model.args, out_dir, dtype, **kwargs)
    else:
        for _ in gathered:  # the gathers are collectives: every rank runs them in the same order
            pass


def export_checkpoint_hf(path: Path, out_dir: Path, dtype: torch.dtype, bos_id=None, eos_id=None, **quantized) -> None:
    """From a checkpoint of plain weights in any layout (pipeline stages too), in one process: DCP
    assembles each parameter from the shards of whatever ranks wrote it, so memory holds one parameter
    plus one output shard, never the whole model."""
    args = read_dcp_args(path)
    shapes = {name: p.shape for name, p in build_meta_model(args).named_parameters()}
    weights = DCPWeights(path, args, shapes)
    write_hf(((name, weights.get(name)) for name in shapes), args, out_dir, dtype, bos_id=bos_id, eos_id=eos_id, **quantized)
