"""The Llama decoder: dense blocks (grouped-query attention with RoPE, SwiGLU), RMSNorm, tied or untied
embeddings. Parameter names: tok_embeddings, layers.{i}.attention.{wq,wk,wv,wo},
layers.{i}.feed_forward.{w1,w2,w3}, layers.{i}.{attention_norm,ffn_norm}, norm, output."""

from models.common.decoder import Decoder
from models.common.dense import DenseBlock
from models.llama.args import LlamaArgs


class LlamaTransformer(Decoder):
    def __init__(self, args: LlamaArgs):
        super().__init__(args, lambda args, layer_id: DenseBlock(args))
