"""Writing the model as a Hugging Face checkpoint of its family (LlamaForCausalLM, Qwen3ForCausalLM):
config.json + safetensors."""

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from trainer.model.args import ModelArgs
from trainer.model.family import family_of
from trainer.model.llama import Transformer
from parallel.placement import gather_full


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    import transformers

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(
            rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_seq_len,
        )
    family = family_of(args)
    config_class = getattr(transformers, family.hf_config_class)
    config = config_class(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, rope_parameters=rope, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    config.architectures = [family.hf_architecture]
    out = config.to_dict()
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def write_hf(
    tensors: Iterable[tuple[str, torch.Tensor]], args: ModelArgs, out_dir: Path, dtype: torch.dtype,
    max_shard_bytes: int = 5 * 2**30, bos_id: int | None = None, eos_id: int | None = None,
) -> None:
    """Writes (our name, whole tensor) pairs as a Hugging Face checkpoint. Shards are written as soon as
    they fill (under temporary names, since the final names carry the shard count), so at most one
    shard is held in CPU memory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    to_hf = family_of(args).to_hf
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
        tensor = full.to(device="cpu", dtype=dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[to_hf(name)] = tensor
        shard_bytes += nbytes
    flush()
    count = len(written)
    weight_map = {}
    for i, (part, keys, _) in enumerate(written):
        file_name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        part.rename(out_dir / file_name)
        weight_map.update({key: file_name for key in keys})
    if count > 1:
        index = {"metadata": {"total_size": sum(size for _, _, size in written)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(hf_config(args, dtype, bos_id, eos_id), indent=2))


@torch.no_grad()
def export_hf(
    model: Transformer, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
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
