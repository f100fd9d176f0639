"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head's queries and keys before RoPE, and a
head size set on its own (128 at every size, so n_heads x head_dim need not equal dim). Everything else
(RMSNorm, SwiGLU, GQA, RoPE, tied or untied embeddings) is Llama's, and so are the module names, plus
layers.{i}.attention.{q_norm,k_norm}.
"""

import torch
from torch import nn

from trainer.model.args import ModelArgs
from trainer.model.llama import Attention, Transformer


class Qwen3Attention(Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3Transformer(Transformer):
    attention = Qwen3Attention


def hf_extra_args(config: dict, head_dim: int) -> dict:
    """A Qwen3Config's head size is its own, and queries and keys are normalized per head."""
    return {"family": "qwen3", "attention_head_dim": head_dim, "qk_norm": True}
