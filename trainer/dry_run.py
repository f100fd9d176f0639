"""`--dry-run`: the resolved config, parameter counts, FLOPs per token and a per-rank memory estimate,
computed on the meta device without loading data or allocating the model."""

from parallel.mesh import ParallelDims
from trainer.config import Config, to_yaml
from trainer.config.checks import check_batch, check_seq_len, check_streams
from trainer.model.args import ModelArgs
from trainer.model.build import build_meta_model, count_params, flops_per_token, resolve_model_args
from trainer.precision import Precision
from trainer.tokenizer import build_tokenizer

GIB = 2**30


def estimate_memory(args: ModelArgs, cfg: Config, dims: ParallelDims, precision: Precision, n_params: int) -> dict:
    """Bytes per rank. Parameters, gradients and AdamW's two moments are float32 and FSDP shards them
    over dp_shard (dp_replicate holds copies). Activations are those saved for backward without
    activation checkpointing, per layer per token (compute dtype): block input and norm outputs (4 x dim),
    q/k before and after RoPE (2 x (dim + kv_dim)), attention's q, k, v, output (4 x dim), the output
    projection's input (dim), SwiGLU's four hidden-size tensors; plus the float32 logits and their gradient.
    """
    shard = dims.dp_shard
    compute_bytes = precision.param_dtype.itemsize
    kv_dim = args.n_kv_heads * args.head_dim
    tokens = cfg.training.local_batch_size * cfg.training.seq_len
    per_token_layer = compute_bytes * (11 * args.dim + 2 * kv_dim + 4 * args.hidden_dim)
    logits = tokens * args.vocab_size * (compute_bytes + 8)
    block_params = n_params / max(1, args.n_layers)
    return {
        "parameters (fp32, sharded)": 4 * n_params / shard,
        "gradients (fp32, sharded)": 4 * n_params / shard,
        "optimizer state (AdamW, fp32, sharded)": 8 * n_params / shard,
        # FSDP gathers the current block and prefetches the next one.
        "gathered parameters in flight": 2 * block_params * compute_bytes if dims.fsdp_enabled else 0,
        "activations (no checkpointing)": tokens * per_token_layer * args.n_layers + logits,
    }


def dry_run(cfg: Config, world_size: int) -> str:
    dims = ParallelDims.from_config(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, world_size)
    accum = check_batch(cfg, dims.dp_size)
    check_streams(cfg, dims.dp_size)
    tokenizer = build_tokenizer(cfg.tokenizer)
    args = resolve_model_args(cfg.model, tokenizer.vocab_size)
    check_seq_len(cfg, args.max_seq_len)
    counts = count_params(build_meta_model(args))
    import torch

    precision = Precision.from_config(
        cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce,
        torch.device("cuda" if torch.cuda.is_available() else "cpu"),
    )
    memory = estimate_memory(args, cfg, dims, precision, counts["total"])
    lines = ["# resolved config", to_yaml(cfg).rstrip(), "", "# model", f"shape: {args}"]
    lines += [f"parameters {k}: {v:,}" for k, v in counts.items()]
    lines += [
        f"FLOPs per token (training): {flops_per_token(args, cfg.training.seq_len):,}",
        f"layout: world {world_size} = dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard}; "
        f"{accum} microbatch(es) of {cfg.training.local_batch_size} x {cfg.training.seq_len} tokens per step",
        "", f"# memory estimate per rank (compute dtype {str(precision.param_dtype).removeprefix('torch.')})",
    ]
    width = max(len(k) for k in memory)
    lines += [f"{k:<{width}}  {v / GIB:10.3f} GiB" for k, v in memory.items()]
    lines.append(f"{'total':<{width}}  {sum(memory.values()) / GIB:10.3f} GiB")
    return "\n".join(lines)
