"""Qwen3's Hugging Face checkpoints (Qwen3ForCausalLM): config.json both ways, parameter names both ways
(Llama's layout plus the per-head query / key norms)."""

import torch

from models.common.hf import DENSE_LAYER_NAMES, NameTable, dense_fields_from_hf, dense_hf_config
from models.qwen3.args import Qwen3Args

NAMES = NameTable({**DENSE_LAYER_NAMES, "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"})


def args_from_config(cfg: dict) -> Qwen3Args:
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported (use_sliding_window)")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return Qwen3Args(**dense_fields_from_hf(cfg), head_dim=head_dim, ffn_hidden_dim=cfg["intermediate_size"])


def config(args: Qwen3Args, *, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    return dense_hf_config(args, config_class="Qwen3Config", architecture="Qwen3ForCausalLM", dtype=dtype,
                           bos_id=bos_id, eos_id=eos_id)
