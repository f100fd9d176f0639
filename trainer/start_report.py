"""What a run says when it starts: what trains on what layout, against which peak, and what each converter
did (from the plan's combined converter answers)."""

import torch

from models import build_meta_model
from trainer.metrics import FastFlops
from trainer.plan import Plan


def fast_flops(plan: Plan, model_flops: int) -> FastFlops | None:
    """The share of the model's FLOPs a converter moved to a faster number format (float8), for MFU."""
    fast = plan.info.fast_matmuls
    return FastFlops(fast.format, min(1.0, fast.flops_per_token / model_flops), fast.peak_ratio) if fast else None


def start_lines(plan: Plan, *, device: torch.device, peak: float, peak_source: str, cpu_threads: str = "") -> list[str]:
    cfg, d, counts = plan.cfg, plan.dims, plan.param_counts
    lines = [
        f"training {counts['trainable']:,} of {counts['total']:,} parameters{plan.info.describe} on {d.world_size} {device.type} rank(s) "
        f"({d.describe()}), {plan.accum_steps} "
        f"microbatch(es) per step; MFU against {peak:.2f} TFLOP/s ({peak_source})",
        *([f"cpu threads: {cpu_threads}"] if cpu_threads else []),
        *plan.info.start_lines,
    ]
    if plan.attention == "document":
        kernel = "FlexAttention, compiled" if plan.attention_kernel == "flex" else "SDPA with a boolean mask"
        lines.append(f"attention: document (each token sees only its own document in a packed window, RoPE positions "
                     f"restarting at each; {kernel})")
    if hasattr(plan.model_args, "num_experts"):
        lines.append(moe_line(plan))
    if plan.teacher_args is not None:
        teacher = sum(p.numel() for p in build_meta_model(plan.teacher_args).parameters())
        lines.append(f"distilling from {cfg.distill.teacher} ({teacher:,} frozen parameters, forward only, sharded like "
                     f"the model): loss = {1 - cfg.distill.kd_ratio:g} x cross-entropy + {cfg.distill.kd_ratio:g} x "
                     f"{cfg.distill.loss} KL at temperature {cfg.distill.temperature:g}; mfu counts the model's FLOPs only")
    fast = plan.info.fast_matmuls
    if fast is not None:
        share = fast_flops(plan, plan.family.flops_per_token(plan.model_args, cfg.training.seq_len)).share
        lines.append(f"{fast.format} runs {100 * share:.1f}% of the model's FLOPs: mfu stays against the peak above (the "
                     f"FLOPs are the model's); mfu_mixed counts them at the {fast.format} peak, {fast.peak_ratio:g}x "
                     f"({fast.source})")
    return lines


def moe_line(plan: Plan) -> str:
    """What a mixture of experts trains: its experts, its routing and balancing, what a token uses."""
    a, cfg, d = plan.model_args, plan.cfg.moe, plan.dims
    coef = a.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    balancing = []
    if coef > 0:
        balancing.append(f"load-balancing loss x {coef:g} over each round of every data-parallel rank's microbatches")
    if a.expert_bias:
        balancing.append(f"expert bias moving {cfg.bias_update_rate:g} a step toward even load")
    routing = a.score_func + (f", {a.topk_groups} of {a.groups} groups" if a.groups > 1 else "")
    shared = f" + {a.shared_experts} shared" if a.shared_experts else ""
    # MFU counts these: the matmul weights a token meets (flops_per_token's own count) and its embedding row.
    active = (plan.family.flops_per_token(a, 0) // 6 + a.vocab_size * a.dim) / 1e6
    split = f"ep {d.ep}" if d.tp == 1 else f"ep {d.ep} x tp {d.tp}"
    ep = f"; {split}: {a.num_experts // d.expert_split} experts of each layer per rank" if d.expert_split > 1 else ""
    return (f"experts: {a.num_experts}{shared} in {len(a.moe_layers)} of {a.n_layers} layers, {a.top_k} per token "
            f"({routing}; {', '.join(balancing) or 'no balancing'}); {active:,.1f}M parameters active per token, "
            f"mfu counts those{ep}")
