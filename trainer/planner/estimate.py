"""A layout's predicted step: per-rank memory (the dry run's estimate, trainer/dry_run.py) and step time
from the device profile's rates.

Time, for the busiest pipeline rank, per microbatch: its matmul FLOPs (blocks, recomputed blocks under
activation checkpointing, the output layer; attention's score and value products) at the profile's
matmul rate for the sizes this layout's matmuls have; elementwise work (norms, activations, RoPE, softmax,
the adds of backward) as bytes streamed at the memory bandwidth; what those terms leave of a real step by
the profile's compute efficiency (measured on a reference model, reference.py); the collectives each
parallel dimension moves at the profile's latency and bus bandwidth, inside a node or between nodes by where
the dimension's ranks sit (tp innermost, then cp, dp_shard, dp_replicate, pp), or where the profile measured
the parallel wrappers themselves (calibrate_layouts.py: FSDP2 per block, a tensor-parallel block's fixed
cost) at those costs. FSDP's gathers and reduce-scatters and the
data-parallel all-reduce hide under compute by the profile's overlap share; tensor, context and expert
parallel collectives and pipeline sends are on the critical path. A pipeline runs (microbatches + pp - 1)
microbatch-times per local batch (the bubble; interleaved: (pp - 1) / stages per rank). Then the optimizer
step streams each trained parameter's state once.
"""

import dataclasses
import math
from dataclasses import dataclass

from models import DecoderArgs
from trainer.dry_run import converted_estimate, device_bytes, estimate_memory
from trainer.plan import Plan
from trainer.planner.devices import DeviceProfile
from trainer.precision import Precision

# Bytes an elementwise kernel moves per element a block saves for backward, over forward and backward (each
# saved tensor written once, read by the next op and by its own backward, its gradient written and read).
ELEMENTWISE_PASSES = 6
# AdamW per trained parameter: reads the parameter, gradient and two moments, writes three back (fp32), and
# the gradient clip reads the gradient once more: 8 x 4 bytes.
OPTIMIZER_BYTES = 32
# The compute terms of a microbatch (the device's own work, no communication), and the calibrated remainder
# of a real step's compute that they leave out (reference.py).
COMPUTE_PARTS = ("compute: block matmuls", "compute: attention", "compute: output layer", "elementwise (memory bound)",
                 "4-bit weights dequantized")
UNCOUNTED = "other ops and per-op overhead (calibrated on a reference model)"


@dataclass(frozen=True)
class Prediction:
    memory: dict[str, float]  # the dry run's lines, bytes per rank
    device_bytes: float  # what of it is on the device
    seconds: dict[str, float]  # the step's predicted time by part (their sum is step_s)
    step_s: float
    tokens_per_s: float  # per device
    mfu: float  # model FLOPs (6N + attention) against the profile's dense peak for the compute dtype


def _dtype_name(precision: Precision) -> str:
    return str(precision.param_dtype).removeprefix("torch.")


def _crosses_nodes(span: int, profile: DeviceProfile, ranks_per_node: int) -> bool:
    """A dimension whose ranks (with those of the dimensions inside it) span more ranks than a node holds."""
    return span > min(ranks_per_node, profile.devices_per_node)


def _attention_flops(args: DecoderArgs, seq_len: int) -> float:
    """Training FLOPs per token per layer of attention's two products (as flops_per_token counts them)."""
    return 12 * args.dim * seq_len


def predict(plan: Plan, profile: DeviceProfile, precision: Precision, parts, *, nodes: int = 1,
            converted=None, memory: bool = True, threads: int | None = None) -> Prediction:
    """`parts`: the busiest pipeline rank's model parts; `converted`: converted_estimate's answer for them
    where the caller keeps it (it depends on the layout's splits and microbatch, not on the rest). Without
    `memory` the time alone (the memory estimate is the slow part: with_memory adds it). `threads` (CPU): a
    rank's threads where not the host's cores shared by the ranks on it."""
    cfg, args, dims = plan.cfg, plan.model_args, plan.dims
    converted = converted or converted_estimate(plan, precision, parts)
    shape, estimate = converted
    seq = cfg.training.seq_len
    ranks_per_node = max(1, dims.world_size // nodes)
    if threads is None:
        threads = max(1, profile.cores // ranks_per_node) if profile.kind == "cpu" else 1
    dtype = _dtype_name(precision)
    compute_bytes = precision.param_dtype.itemsize
    reduce_bytes = precision.reduce_dtype.itemsize

    micro_batch = cfg.training.local_batch_size // plan.pp_microbatches
    tokens = micro_batch * seq // dims.cp  # this rank's tokens per microbatch
    layers = sum(len(part.layers) for part in parts)
    has_head = any(getattr(part, "output", None) is not None for part in parts)
    total_flops = plan.family.flops_per_token(args, seq)
    head_flops = 6 * args.vocab_size * args.dim
    attention = _attention_flops(args, seq)
    block_matmul = (total_flops - head_flops - 6 * args.dim) / args.n_layers - attention  # per token per layer
    # Frozen weights (adapters over a frozen base) need no weight gradient: 4 of 6 FLOPs per parameter.
    frozen = 1 - shape.trainable / shape.params
    block_matmul *= 1 - frozen / 3
    ac = cfg.activation_checkpoint
    # Recomputed in backward: checkpointed blocks run their forward again (a third of a block's training FLOPs);
    # selective_op keeps matmul outputs and recomputes only the elementwise ops between them.
    recompute = {"full": 1 / 3, "selective_layer": 1 / (3 * ac.every)}.get(ac.mode, 0.0)
    recompute_elementwise = 1 / 3 if ac.mode == "selective_op" else recompute
    hidden = max(args.dim, getattr(args, "hidden_dim", args.dim))
    mm_rate = profile.matmul_flops(dtype, (args.dim * hidden / dims.tp) ** 0.5, threads)
    block_rate = mm_rate
    if any(c.name == "float8" for c in plan.converters):
        block_rate = mm_rate * profile.float8_speedup
    head_rate = profile.matmul_flops(dtype, (args.dim * args.vocab_size / dims.tp) ** 0.5, threads)
    attn_rate = profile.attention_flops(dtype, seq, threads)
    bandwidth = profile.memory_bytes_per_s / (ranks_per_node if profile.kind == "cpu" else 1)

    seconds: dict[str, float] = {}
    per_mb = {
        "compute: block matmuls": tokens * layers * block_matmul * (1 + recompute) / dims.tp / block_rate,
        "compute: attention": tokens * layers * attention * (1 + recompute) / dims.tp / attn_rate,
        "compute: output layer": tokens * head_flops / dims.tp / head_rate if has_head else 0.0,
        "elementwise (memory bound)": ELEMENTWISE_PASSES * tokens * layers * compute_bytes / dims.tp
        / profile.elementwise_bytes_per_s(dtype, threads)
        * plan.family.activation_elements(args, "none", 1) * (1 + recompute_elementwise),
    }
    if estimate.dequantized:
        # A 4-bit weight is rebuilt for the forward, again for the backward, and again where recomputed.
        uses = 2 + (1 if recompute else 0)
        rate = profile.dequantize_per_s or profile.memory_bytes_per_s / 2.5
        per_mb["4-bit weights dequantized"] = estimate.dequantized * uses / rate
    uncounted = sum(per_mb.values()) * (1 / profile.efficiency(dtype, threads) - 1)
    if uncounted:
        per_mb[UNCOUNTED] = uncounted
    compute_mb = sum(per_mb.values())

    # Collectives per microbatch on the critical path.
    def link(name: str, span: int):
        """The link, its latency raised by the wait for the last rank where a collective sits between compute."""
        found = profile.link(name, _crosses_nodes(span, profile, ranks_per_node))
        return dataclasses.replace(found, latency_s=found.latency_s + profile.sync_s)

    critical = {}
    forwards = 2 if ac.mode in ("full", "selective_layer") else 1  # checkpointed blocks gather again
    if dims.tp > 1:
        # Sequence parallel: attention and MLP each all-gather their input and reduce-scatter their output,
        # forward (again where recomputed) and backward; the output layer gathers the final norm's output.
        activation = micro_batch * seq // dims.cp * args.dim * compute_bytes * (dims.tp - 1) / dims.tp
        calls = layers * 4 * (1 + forwards) + (2 if has_head else 0)
        gather, scatter = link("all_gather", dims.tp), link("reduce_scatter", dims.tp)
        fixed = 0.0
        if profile.tp_block_s:
            # Measured per split block (DTensor's dispatch, the collectives' latency): it replaces the links'
            # latencies; the wait for the last rank and the bytes come on top.
            fixed = layers * (profile.tp_block_s + (forwards - 1) * profile.tp_forward_s) + calls * profile.sync_s
            gather, scatter = (dataclasses.replace(x, latency_s=0.0) for x in (gather, scatter))
        critical["tensor parallel (sequence-parallel gathers and scatters)"] = \
            fixed + gather.seconds(calls / 2 * activation, calls // 2) + scatter.seconds(calls / 2 * activation, calls // 2)
    if dims.cp > 1:
        # Keys and values all-gathered in every forward, their gradients reduce-scattered in the backward.
        kv = micro_batch * seq * 2 * args.n_kv_heads * args.head_dim / dims.tp * compute_bytes * (dims.cp - 1) / dims.cp
        span = dims.cp * dims.tp
        critical["context parallel (keys and values gathered, their gradients scattered)"] = \
            link("all_gather", span).seconds(layers * forwards * kv, layers * forwards) \
            + link("reduce_scatter", span).seconds(layers * kv, layers)
    if dims.ep > 1 and hasattr(args, "num_experts"):
        moe_layers = len(getattr(args, "moe_layers", range(args.n_layers))) * layers / args.n_layers
        sent = tokens * args.top_k * args.dim * compute_bytes * (dims.ep - 1) / dims.ep
        calls = moe_layers * 2 * (1 + forwards)
        critical["expert parallel (tokens to experts and back)"] = link("all_to_all", dims.ep * dims.cp * dims.tp).seconds(
            calls * sent, round(calls))
    if dims.pp > 1:
        boundary = tokens * args.dim * compute_bytes
        stages_here = len(parts)
        critical["pipeline sends (activations and their gradients)"] = link("send_recv", dims.world_size).seconds(
            2 * stages_here * boundary, 2 * stages_here)
    comm_mb = sum(critical.values())

    # Data-parallel traffic. FSDP gathers a block's weights for every microbatch's forward (and again for its
    # backward where it resharded); gradients are reduce-scattered (and HSDP's replicas all-reduce their
    # shards) after every backward, but with pipelining once per local batch (the stage syncs the last one).
    fsdp, r = dims.fsdp_shards, dims.dp_replicate

    def data_parallel(kind: str, collective: str, span: int):
        """FSDP's own per-block cost as calibrated (copies, Python, the collective) where the profile has it
        and the ranks share a node, plus the wait for the last rank (the calibration's compute segments are
        too short to show it); else the raw collective's link."""
        measured = profile.fsdp_links.get(kind)
        if measured and not _crosses_nodes(span, profile, ranks_per_node):
            return dataclasses.replace(measured, latency_s=measured.latency_s + profile.sync_s)
        return link(collective, span)

    gathers = reduces = 0.0
    regather = 2 if cfg.parallel.fsdp_reshard_after_forward != "never" else 1
    if fsdp > 1:
        gathered = shape.params / dims.tp * estimate.gathered_bytes * (fsdp - 1) / fsdp
        gathers = data_parallel("gather", "all_gather", fsdp * dims.tp).seconds(regather * gathered, regather * layers)
        scattered = shape.trainable / dims.tp * reduce_bytes * (fsdp - 1) / fsdp
        reduces += data_parallel("reduce", "reduce_scatter", fsdp * dims.tp).seconds(scattered, layers)
    if r > 1:
        span = dims.world_size // dims.pp
        shard = shape.trainable / dims.tp / fsdp * reduce_bytes
        reduces += data_parallel("replicate_reduce", "all_reduce", span).seconds(2 * shard * (r - 1) / r, layers)
        if fsdp == 1 and "replicate_gather" in profile.fsdp_links:  # no bytes to gather; the units' own cost
            gathers += regather * layers * profile.fsdp_links["replicate_gather"].latency_s

    def exposed(comm: float) -> float:
        """What of `comm` compute running meanwhile (one microbatch's) does not hide."""
        return max(comm * (1 - profile.overlap), comm - compute_mb)

    if dims.pp > 1:
        slots = plan.pp_microbatches + (dims.pp - 1) / len(parts)  # microbatch-times, the bubble included
        stage_mb = compute_mb + comm_mb + exposed(gathers)
        busy = plan.pp_microbatches * plan.accum_steps
        reduce_exposed = exposed(reduces) * plan.accum_steps
        seconds["pipeline bubble"] = stage_mb * (slots - plan.pp_microbatches) * plan.accum_steps
    else:
        stage_mb = compute_mb + comm_mb + exposed(gathers + reduces)
        busy = plan.accum_steps
        reduce_exposed = 0.0
    seconds.update({k: v * busy for k, v in per_mb.items()})
    seconds.update({k: v * busy for k, v in critical.items()})
    if gathers or reduces:
        seconds["data-parallel traffic not hidden under compute"] = (stage_mb - compute_mb - comm_mb) * busy + reduce_exposed
    trained_here = shape.trainable * shape.share
    seconds["optimizer step"] = OPTIMIZER_BYTES * trained_here / bandwidth
    step = sum(seconds.values())
    global_tokens = cfg.training.local_batch_size * plan.accum_steps * dims.dp_size * seq
    per_device = global_tokens / step / dims.world_size
    peak = profile.peak_flops.get(dtype) or max(profile.peak_flops.values())
    if profile.kind == "cpu":
        peak = peak * threads / max(1, profile.cores)  # a rank's share of the host's cores
    mfu = per_device * total_flops / peak if peak else math.nan
    timed = Prediction(memory={}, device_bytes=math.nan, seconds=seconds, step_s=step, tokens_per_s=per_device, mfu=mfu)
    return with_memory(timed, plan, precision, parts, converted) if memory else timed


def with_memory(prediction: Prediction, plan: Plan, precision: Precision, parts, converted=None) -> Prediction:
    """The prediction with the dry run's memory estimate for the plan filled in."""
    memory = estimate_memory(plan, precision, parts, converted)
    return dataclasses.replace(prediction, memory=memory, device_bytes=device_bytes(memory))
