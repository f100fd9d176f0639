"""Qwen3-MoE's Hugging Face checkpoints (Qwen3MoeForCausalLM): config.json both ways, parameter names both
ways (Qwen3's, plus the router `mlp.gate` and the experts, which HF files hold one tensor per expert)."""

import torch

from models.common.hf import DENSE_LAYER_NAMES, NameTable, StackedExperts, dense_fields_from_hf, dense_hf_config
from models.qwen3_moe.args import Qwen3MoEArgs

NAMES = NameTable({**DENSE_LAYER_NAMES, "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
                   "mlp.gate": "moe.router"})
EXPERTS = StackedExperts()


def args_from_config(cfg: dict) -> Qwen3MoEArgs:
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported (use_sliding_window)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # transformers writes the expert count as num_local_experts (an alias of num_experts) since version 5.
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))
    if experts is None:
        raise KeyError("num_experts")
    return Qwen3MoEArgs(
        **dense_fields_from_hf(cfg), head_dim=head_dim, ffn_hidden_dim=cfg["intermediate_size"], num_experts=experts,
        top_k=cfg["num_experts_per_tok"], moe_hidden_dim=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()), router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001),
    )


def config(args: Qwen3MoEArgs, *, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    why = args.hf_compatible
    if why is not None:
        raise ValueError(f"this model cannot be written as a Qwen3MoeForCausalLM checkpoint: {why}")
    return dense_hf_config(
        args, config_class="Qwen3MoeConfig", architecture="Qwen3MoeForCausalLM", dtype=dtype, bos_id=bos_id, eos_id=eos_id,
        num_experts=args.num_experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_hidden_dim,
        norm_topk_prob=args.norm_topk_prob, decoder_sparse_step=args.decoder_sparse_step,
        mlp_only_layers=list(args.mlp_only_layers), router_aux_loss_coef=args.router_aux_loss_coef,
    )
