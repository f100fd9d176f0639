"""Llama's Hugging Face checkpoints (LlamaForCausalLM): config.json both ways, parameter names both ways."""

import torch

from models.common.hf import DENSE_LAYER_NAMES, NameTable, dense_fields_from_hf, dense_hf_config
from models.llama.args import LlamaArgs

NAMES = NameTable(DENSE_LAYER_NAMES)


def args_from_config(cfg: dict) -> LlamaArgs:
    fields = dense_fields_from_hf(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError("head_dim x heads != hidden_size is not supported for Llama")
    return LlamaArgs(**fields, ffn_hidden_dim=cfg["intermediate_size"])


def config(args: LlamaArgs, *, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    return dense_hf_config(args, config_class="LlamaConfig", architecture="LlamaForCausalLM", dtype=dtype,
                           bos_id=bos_id, eos_id=eos_id)
