"""Qwen3-MoE: Qwen3's attention, then a mixture of experts (models/common/moe.py) or, in the layers
args.is_moe_layer leaves out, a dense SwiGLU. Parameter names: Qwen3's, with layers.{i}.moe.router,
layers.{i}.moe.experts.{w1,w2,w3} (stacked over the experts), layers.{i}.moe.shared.{w1,w2,w3} and the
buffer layers.{i}.moe.expert_bias where the routing has them; dense layers keep layers.{i}.feed_forward."""

import torch
from torch import nn

from models.common.decoder import Decoder
from models.common.dense import FeedForward
from models.common.kv_cache import LayerCache
from models.common.masking import WindowMask
from models.common.moe import MoE
from models.qwen3.model import Qwen3Attention
from models.qwen3_moe.args import Qwen3MoEArgs


class MoEBlock(nn.Module):
    def __init__(self, args: Qwen3MoEArgs, layer_id: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Qwen3Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.is_moe_layer(layer_id):
            self.moe = MoE(args.dim, args.moe_hidden_dim, args.routing)
        else:
            self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None,
                start: int = 0, mask: WindowMask | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, start=start, mask=mask)
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Qwen3MoETransformer(Decoder):
    def __init__(self, args: Qwen3MoEArgs):
        super().__init__(args, MoEBlock)
