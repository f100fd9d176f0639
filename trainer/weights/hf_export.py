"""Writing the model as a Hugging Face LlamaForCausalLM checkpoint (config.json + safetensors).

Works from any layout: each parameter is gathered whole in turn (all ranks take part), moved to CPU, and
rank 0 writes shards of at most `max_shard_bytes`; no rank ever holds the whole model on its accelerator.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from trainer.model.args import ModelArgs
from trainer.model.llama import Transformer
from trainer.weights.hf_names import ours_to_hf
from trainer.weights.placement import gather_full


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    from transformers import LlamaConfig  # the installed version decides the config's field layout

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(
            rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_seq_len,
        )
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, rope_parameters=rope, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    out = config.to_dict()
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


@torch.no_grad()
def export_hf(
    model: Transformer, out_dir: Path, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30,
    bos_id: int | None = None, eos_id: int | None = None,
) -> None:
    writer = not dist.is_initialized() or dist.get_rank() == 0
    out_dir = Path(out_dir)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    # Shards are written as soon as they fill (under temporary names, since the final names carry the
    # shard count), so rank 0 holds at most one shard in CPU memory.
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        part = out_dir / f".part-{len(written):05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        written.append((part, list(shard), shard_bytes))
        shard, shard_bytes = {}, 0

    for name, param in model.named_parameters():
        full = gather_full(param)  # collective: every rank runs this loop in the same order
        if not writer:
            continue
        tensor = full.to(device="cpu", dtype=dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[ours_to_hf(name)] = tensor
        shard_bytes += nbytes
    if not writer:
        return
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
    config = hf_config(model.args, dtype, bos_id, eos_id)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
