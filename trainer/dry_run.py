"""`--dry-run`: the resolved config, parameter counts, FLOPs per token and a per-rank memory estimate,
computed on the meta device without loading data or allocating the model."""

import torch

from trainer.config import Config, to_yaml
from trainer.converters import convert
from trainer.distill.teacher import teacher_memory
from trainer.model.build import build_meta_model, count_params, flops_per_token
from trainer.model.family import family_of
from trainer.plan import Plan, build_converters, make_plan
from trainer.precision import Precision

GIB = 2**30
HOST = "host (CPU offload): "


def _rank_params(plan: Plan, cfg: Config) -> tuple[int, int, int, int, int]:
    """(parameters, of which sharded by TP, transformer layers, trainable parameters, base weights under
    adapters) on the most loaded pipeline rank."""
    converters = build_converters(cfg)
    model = convert(build_meta_model(plan.model_args), converters)
    dims = plan.dims
    if dims.pp > 1:
        ranks = [
            [part for _, part in family_of(plan.model_args).split_stages(model, pp_rank=r, pp_size=dims.pp, num_stages=plan.num_stages)]
            for r in range(dims.pp)
        ]
    else:
        ranks = [[model]]

    def stats(parts):
        total = sum(p.numel() for part in parts for p in part.parameters())
        norms = sum(p.numel() for part in parts for n, p in part.named_parameters() if "norm" in n)
        trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
        adapted = sum(c.count_adapted(parts) for c in converters)
        return total, total - norms, sum(len(part.layers) for part in parts), trainable, adapted

    return max((stats(parts) for parts in ranks), key=lambda s: s[0])


def _saved_per_token_layer(args, mode: str, every: int) -> float:
    """Elements saved for backward per token per layer (see estimate_memory)."""
    kv = args.n_kv_heads * args.head_dim
    full = 11 * args.dim + 2 * kv + 4 * args.hidden_dim
    if mode == "full":
        return args.dim  # only the block input; one block's activations exist at a time during recompute
    if mode == "selective_layer":
        return (args.dim + (every - 1) * full) / every
    if mode == "selective_op":
        return 4 * args.dim + 2 * kv + 2 * args.hidden_dim  # matmul and attention outputs, the block input
    return full


def estimate_memory(plan: Plan, cfg: Config, precision: Precision) -> dict[str, float]:
    """Bytes per rank, an estimate. Parameters, gradients and AdamW's two moments are float32, split by
    pipeline stage, tensor parallelism (all but norm gains) and FSDP (over dp_shard; dp_replicate holds
    copies). Activations without checkpointing, per layer per token in the compute dtype: block input
    and norm outputs (4 x dim), q/k before and after RoPE (2 x (dim + kv_dim)), attention's q, k, v and
    output (4 x dim), the output projection's input (dim), SwiGLU's four hidden-size tensors; split by
    TP (heads and hidden columns; the sequence for the rest); held for every microbatch a pipeline
    schedule keeps in flight; plus the float32 logits and their gradient on the last stage.
    """
    args, dims = plan.model_args, plan.dims
    params, tp_sharded, layers, trainable, adapted = _rank_params(plan, cfg)
    per_rank_params = (tp_sharded / dims.tp + (params - tp_sharded)) / dims.dp_shard
    # Gradients and optimizer state exist only for what trains (with adapters: the adapters alone).
    per_rank_trainable = per_rank_params * trainable / params
    compute_bytes = precision.param_dtype.itemsize
    weights, weights_label = 4 * per_rank_params, "parameters (fp32)"
    gathered_bytes = compute_bytes  # per parameter of a block that FSDP gathers
    for converter in build_converters(cfg):  # the config's, which may differ from the plan's (what-ifs)
        stored = converter.weight_bytes(params=params, trainable=trainable, adapted=adapted, share=per_rank_params / params,
                                        compute_bytes=compute_bytes, dp_shard=dims.dp_shard)
        if stored is not None:
            weights, weights_label, gathered_bytes = stored
    converters = build_converters(cfg)
    model = convert(build_meta_model(args), converters)
    gathered_bytes = next((b for c in converters if (b := c.gathered_bytes(model, gathered_bytes)) is not None),
                          gathered_bytes)
    micro_tokens = cfg.training.local_batch_size // plan.pp_microbatches * cfg.training.seq_len
    if dims.pp == 1:
        in_flight = 1
    elif cfg.parallel.pp_schedule == "gpipe":
        in_flight = plan.pp_microbatches
    else:
        in_flight = min(plan.pp_microbatches, dims.pp)
    saved = _saved_per_token_layer(args, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.every)
    activations = micro_tokens * layers * saved * compute_bytes / dims.tp * in_flight
    vocab = args.vocab_size / dims.tp if dims.tp > 1 and cfg.parallel.loss_parallel else args.vocab_size
    # Chunked: one chunk's fp32 logits and their gradient at a time, recomputed in backward.
    logit_tokens = min(micro_tokens, cfg.training.loss_chunk_tokens) if plan.chunked_loss else micro_tokens
    logits = logit_tokens * vocab * (compute_bytes + 8)
    block = (params - args.vocab_size * args.dim) / max(1, layers) / dims.tp
    # With FSDP's CPU offload the sharded parameters, their gradients and the optimizer live in host memory.
    host = HOST if cfg.parallel.cpu_offload and dims.dp_size > 1 else ""
    extra = {k: v for c in converters for k, v in c.memory(model, micro_tokens=micro_tokens, tp=dims.tp).items()}
    if plan.teacher_args is not None:
        extra.update(teacher_memory(plan.teacher_args, cfg, dp_shard=dims.dp_shard, micro_tokens=micro_tokens,
                                    compute_bytes=compute_bytes))
    return {
        host + weights_label: weights,
        host + "gradients (fp32, trainable only)": 4 * per_rank_trainable,
        host + "optimizer state (AdamW, fp32, trainable only)": 8 * per_rank_trainable,
        # FSDP gathers the current block and prefetches the next one.
        "gathered parameters in flight": 2 * block * gathered_bytes if dims.dp_shard > 1 else 0,
        f"activations (AC {cfg.activation_checkpoint.mode}, {in_flight} microbatch(es) in flight)": activations,
        ("logits + their gradient, one chunk of " f"{logit_tokens} tokens" if plan.chunked_loss
         else "logits + their gradient"): logits,
        **extra,
    }


def dry_run(cfg: Config, world_size: int) -> str:
    plan = make_plan(cfg, world_size)
    args, dims = plan.model_args, plan.dims
    counts = count_params(convert(build_meta_model(args), plan.converters))  # adapters add parameters, freeze the base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision.from_config(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, device)
    memory = estimate_memory(plan, cfg, precision)
    lines = ["# resolved config", to_yaml(cfg).rstrip(), "", "# model", f"shape: {args}"]
    lines += [f"parameters {k}: {v:,}" for k, v in counts.items()]
    lines += [
        f"FLOPs per token (training): {flops_per_token(args, cfg.training.seq_len):,}",
        f"layout: world {world_size} = pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x "
        f"tp {dims.tp}; {plan.accum_steps} microbatch(es) of {cfg.training.local_batch_size} x {cfg.training.seq_len} "
        f"tokens per step",
        "", f"# memory estimate per rank (compute dtype {str(precision.param_dtype).removeprefix('torch.')})",
    ]
    width = max(len(k) for k in memory)
    lines += [f"{k:<{width}}  {v / GIB:10.3f} GiB" for k, v in memory.items()]
    device_total = sum(v for k, v in memory.items() if not k.startswith(HOST))
    lines.append(f"{'total on the device':<{width}}  {device_total / GIB:10.3f} GiB")
    if device_total < sum(memory.values()):
        lines.append(f"{'total in host memory':<{width}}  {(sum(memory.values()) - device_total) / GIB:10.3f} GiB")
    return "\n".join(lines)
