"""`--dry-run`: the resolved config, parameter counts, FLOPs per token and a per-rank memory estimate,
computed on the meta device without loading data or allocating the model."""

import torch

from trainer.config import to_yaml
from trainer.converters import MemoryEstimate, MemoryShape
from trainer.distill.teacher import teacher_memory
from trainer.optimizer import MOMENTS, state_bytes
from trainer.plan import Plan
from trainer.precision import Precision

GIB = 2**30
HOST = "host (CPU offload): "
OFFLOADED = "host (offloaded): "
NOT_AT_ONCE = "not held at once: the blocks' gradients, made as their activations are freed"


def device_bytes(memory: dict[str, float]) -> float:
    """The estimate's lines that are in the device's memory (not those offloaded to the host)."""
    return sum(v for k, v in memory.items() if not k.startswith((HOST, OFFLOADED)))


def busiest_parts(plan: Plan) -> list[torch.nn.Module]:
    """The model parts of the pipeline rank that holds the most parameters (all of it without pipelining).
    The layout planner keeps them per pipeline size: splitting a 405B model's stages is an estimate's slow part."""
    dims = plan.dims
    if dims.pp == 1:
        return [plan.meta]
    ranks = [[part for _, part in plan.family.split_stages(plan.meta, pp_rank=r, pp_size=dims.pp, num_stages=plan.num_stages)]
             for r in range(dims.pp)]
    return max(ranks, key=lambda parts: sum(p.numel() for part in parts for p in part.parameters()))


def converted_estimate(plan: Plan, precision: Precision, parts: list[torch.nn.Module]) -> tuple[MemoryShape, MemoryEstimate]:
    """The busiest rank's shape, and the stored weights as the converters leave them (what FSDP gathers per
    parameter among them)."""
    cfg, dims = plan.cfg, plan.dims
    params = sum(p.numel() for part in parts for p in part.parameters())
    tp_sharded = params - sum(p.numel() for part in parts for n, p in part.named_parameters() if "norm" in n)
    trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
    per_rank_params = (tp_sharded / dims.tp + (params - tp_sharded)) / dims.fsdp_shards
    compute_bytes = precision.param_dtype.itemsize
    micro_batch = cfg.training.local_batch_size // plan.pp_microbatches
    micro_tokens = micro_batch * cfg.training.seq_len // dims.cp  # this rank's share of the sequences
    shape = MemoryShape(model=plan.meta, parts=parts, params=params, trainable=trainable, share=per_rank_params / params,
                        compute_bytes=compute_bytes, dp_shard=dims.fsdp_shards, tp=dims.tp, micro_tokens=micro_tokens)
    estimate = MemoryEstimate(weights=4 * per_rank_params, weights_label="parameters (fp32)", gathered_bytes=compute_bytes)
    for converter in plan.converters:
        estimate = converter.memory(shape, estimate)
    return shape, estimate


def estimate_memory(plan: Plan, precision: Precision, parts: list[torch.nn.Module] | None = None,
                    converted: tuple[MemoryShape, MemoryEstimate] | None = None) -> dict[str, float]:
    """Bytes per rank, an estimate. Parameters, gradients and AdamW's two moments are float32, split by
    pipeline stage, tensor parallelism (all but norm gains) and FSDP (over dp_shard x cp; dp_replicate
    holds copies). Activations: what the family says a block saves per token of the rank's share of the
    sequence (1/cp of it), in the compute dtype, split by TP, held for every microbatch a pipeline
    schedule keeps in flight; under cp also every layer's gathered keys and values; the attention mask of
    document attention or cp; plus the float32 logits and their gradient on the last stage. Converters
    then fold in their own effects, in order. The optimizer's state is what optimizer.name keeps per
    parameter. With one backward per step the blocks' gradients and the activations they replace are not
    held at once (a negative line). What optimizer.offload and activation offloading move to the host is
    listed with the OFFLOADED prefix, outside the device's total. `parts` and `converted` are what
    busiest_parts and converted_estimate return for this plan, where the caller keeps them (the planner).
    """
    cfg, args, dims = plan.cfg, plan.model_args, plan.dims
    parts = parts if parts is not None else busiest_parts(plan)
    shape, estimate = converted or converted_estimate(plan, precision, parts)
    params, trainable, compute_bytes, micro_tokens = shape.params, shape.trainable, shape.compute_bytes, shape.micro_tokens
    micro_batch = cfg.training.local_batch_size // plan.pp_microbatches
    layers = sum(len(part.layers) for part in parts)
    per_rank_params = shape.share * params
    # Gradients and optimizer state exist only for what trains (with adapters: the adapters alone).
    per_rank_trainable = per_rank_params * trainable / params
    if dims.pp == 1:
        in_flight = 1
    elif cfg.parallel.pp_schedule == "gpipe":
        in_flight = plan.pp_microbatches
    else:
        in_flight = min(plan.pp_microbatches, dims.pp)
    ac = cfg.activation_checkpoint
    saved = plan.family.activation_elements(args, ac.mode, ac.every)
    activations = micro_tokens * layers * saved * compute_bytes / dims.tp * in_flight
    if ac.mode in ("full", "selective_layer"):
        # The block being recomputed in backward holds all of its activations meanwhile.
        recomputed = plan.family.activation_elements(args, "none", 1) - plan.family.activation_elements(args, "full", 1)
        activations += micro_tokens * recomputed * compute_bytes / dims.tp
    offloaded = 0.0
    if ac.offload:
        # Every block but the last of each part moves what it saves to the host (checkpointed blocks their
        # input; selective_op keeps its saved outputs on the device); in backward one block's come back.
        moved = args.dim if ac.mode == "selective_op" else saved
        per_block = micro_tokens * moved * compute_bytes / dims.tp
        offloaded = per_block * (layers - len(parts)) * in_flight
        activations -= offloaded - per_block
    vocab = args.vocab_size / dims.tp if dims.tp > 1 and cfg.parallel.loss_parallel else args.vocab_size
    # Chunked: one chunk's fp32 logits and their gradient at a time, recomputed in backward.
    logit_tokens = min(micro_tokens, cfg.training.loss_chunk_tokens) if plan.chunked_loss else micro_tokens
    logits = logit_tokens * vocab * (compute_bytes + 8)
    # A rank gathers only its own experts of a block (1 / (ep x tp) of them) and the rest of a MoE layer
    # whole: tensor parallelism runs it on each rank's own tokens rather than splitting its matmuls.
    moe = sum(p.numel() for part in parts for n, p in part.named_parameters() if ".moe." in n)
    experts = sum(p.numel() for part in parts for n, p in part.named_parameters() if ".moe.experts." in n)
    dense = params - moe - args.vocab_size * args.dim
    block = (dense / dims.tp + moe - experts * (1 - 1 / dims.expert_split)) / max(1, layers)
    # With FSDP's CPU offload the sharded parameters, their gradients and the optimizer live in host memory.
    host = HOST if cfg.parallel.cpu_offload and dims.fsdp_shards * dims.dp_replicate > 1 else ""
    extra = dict(estimate.extra)
    if dims.cp > 1:
        # Each layer keeps the whole sequence's keys and values for its backward: (cp - 1)/cp of them gathered.
        kv = args.n_kv_heads * args.head_dim / dims.tp
        gathered = micro_batch * cfg.training.seq_len * (dims.cp - 1) / dims.cp * 2 * kv * compute_bytes
        extra[f"keys and values gathered over cp={dims.cp}, every layer"] = gathered * layers * in_flight
    # Causal cp chunks need no mask on CPU (models/common/causal_runs.py); FlexAttention's block mask is small.
    masked = plan.attention == "document" or (dims.cp > 1 and torch.cuda.is_available())
    if masked and plan.attention_kernel == "sdpa":
        # One boolean mask per microbatch, shared by every layer (SDPA keeps it for the backward), and the
        # copy in the compute dtype SDPA's kernels turn it into while a layer attends.
        extra["attention mask (queries x keys: bool, and a compute-dtype copy while attending)"] = \
            micro_tokens * cfg.training.seq_len * (in_flight + compute_bytes)
    if compute_bytes < 4 and dims.fsdp_shards * dims.dp_replicate == 1:
        # Without FSDP, autocast casts each float32 weight a matmul reads and keeps the copy until the step's
        # backward is done (the embedding lookup reads its weight as it is, unless the head shares it).
        # Compiled blocks cast inside their graphs and keep nothing: then only the head's copy stays.
        cast = sum(p.numel() for part in parts for n, p in part.named_parameters() if p.requires_grad and p.ndim > 1
                   and (args.tie_embeddings or not n.startswith("tok_embeddings"))
                   and not (cfg.compile.enabled and n.startswith("layers.")))
        extra["weight copies in the compute dtype (autocast, for the step)"] = compute_bytes * cast * shape.share
    if offloaded:
        extra[OFFLOADED + "activations of every block but the last"] = offloaded
    if cfg.optimizer.offload == "cpu":
        # Float32 copies of the trained parameter shards and a gradient buffer beside each (the state's own line
        # says host too).
        extra[OFFLOADED + "optimizer's copies of the parameters and gradients (fp32)"] = 8 * per_rank_trainable
    if plan.teacher_args is not None:
        extra.update(teacher_memory(plan.teacher_args, cfg.distill, hqq_group_size=cfg.adapters.hqq_group_size,
                                    dp_shard=dims.dp_shard, micro_tokens=micro_tokens, compute_bytes=compute_bytes))
    gradients = 4 * per_rank_trainable
    if plan.accum_steps == 1 and dims.pp == 1 and not host:
        # One backward per step: a block's gradients are made as its activations are freed, so at the
        # backward's start (the activations' peak) only the output layer's exist, and at its end no
        # activation is left. Peak = the larger of the two, here as what is not held at once.
        head = sum(p.numel() for n, p in plan.meta.named_parameters() if p.requires_grad and n.startswith("output."))
        overlap = min(gradients - 4 * head * shape.share, activations + logits)
        extra[NOT_AT_ONCE] = -max(0.0, overlap)
    return {
        host + estimate.weights_label: estimate.weights,
        host + "gradients (fp32, trainable only)": gradients,
        (host or (OFFLOADED if cfg.optimizer.offload == "cpu" else "")) +
        f"optimizer state (AdamW, {MOMENTS[cfg.optimizer.name]}, trainable only)":
            state_bytes(cfg.optimizer.name, [p.numel() * shape.share for part in parts for p in part.parameters()
                                             if p.requires_grad]),
        # FSDP gathers the current block and prefetches the next one.
        "gathered parameters in flight": 2 * block * estimate.gathered_bytes if dims.fsdp_shards > 1 else 0,
        f"activations (AC {cfg.activation_checkpoint.mode}, {in_flight} microbatch(es) in flight)": activations,
        ("logits + their gradient, one chunk of " f"{logit_tokens} tokens" if plan.chunked_loss
         else "logits + their gradient"): logits,
        **extra,
    }


def dry_run(plan: Plan) -> str:
    cfg, args, dims = plan.cfg, plan.model_args, plan.dims
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = Precision.from_config(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, device)
    memory = estimate_memory(plan, precision)
    lines = ["# resolved config", to_yaml(cfg).rstrip(), "", "# model", f"shape: {args}"]
    if plan.converters:
        lines.append(f"converters: {' -> '.join(c.name for c in plan.converters)}")
    lines += [f"parameters {k}: {v:,}" for k, v in plan.param_counts.items()]  # adapters add some, freeze the base
    lines += [
        f"FLOPs per token (training): {plan.family.flops_per_token(args, cfg.training.seq_len):,}",
        f"layout: world {dims.world_size} = {dims.describe()}; {plan.accum_steps} microbatch(es) of {cfg.training.local_batch_size} x {cfg.training.seq_len} "
        f"tokens per step",
        "", f"# memory estimate per rank (compute dtype {str(precision.param_dtype).removeprefix('torch.')})",
    ]
    width = max(len(k) for k in memory)
    lines += [f"{k:<{width}}  {v / GIB:10.3f} GiB" for k, v in memory.items()]
    device_total = device_bytes(memory)
    lines.append(f"{'total on the device':<{width}}  {device_total / GIB:10.3f} GiB")
    if device_total < sum(memory.values()):
        lines.append(f"{'total in host memory':<{width}}  {(sum(memory.values()) - device_total) / GIB:10.3f} GiB")
    return "\n".join(lines)
