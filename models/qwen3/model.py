"""Qwen3 (dense): dense blocks whose attention normalizes each head's queries and keys (RMSNorm) before
RoPE. Parameter names are Llama's, plus layers.{i}.attention.{q_norm,k_norm}."""

import torch
from torch import nn

from models.common.attention import Attention
from models.common.decoder import Decoder
from models.common.dense import DenseBlock
from models.qwen3.args import Qwen3Args


class Qwen3Attention(Attention):
    def __init__(self, args: Qwen3Args):
        super().__init__(args)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3Transformer(Decoder):
    def __init__(self, args: Qwen3Args):
        super().__init__(args, lambda args, layer_id: DenseBlock(args, Qwen3Attention))
