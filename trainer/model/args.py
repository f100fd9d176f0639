"""The shape of a Llama-family decoder."""

import dataclasses
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are slowed by `factor`, short ones kept."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    # The SwiGLU hidden size; when None it follows Meta's rule from multiple_of / ffn_dim_multiplier.
    ffn_hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Which model family builds this shape (trainer/model/family.py): llama or qwen3.
    family: str = "llama"
    # Per-head size when it is not dim / n_heads (Qwen3: 128 for every size).
    attention_head_dim: int | None = None
    # RMSNorm over each head's queries and keys before RoPE (Qwen3).
    qk_norm: bool = False

    def __post_init__(self):
        if self.attention_head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim {self.head_dim} must be even for RoPE")
        if self.vocab_size < 1:
            raise ValueError(f"model vocab_size {self.vocab_size} must be positive")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_json(self) -> str:
        """The shape as JSON: checkpoints carry it, so that model.init_from=<checkpoint> can rebuild it."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelArgs":
        fields = json.loads(text)
        scaling = fields.pop("rope_scaling")
        return cls(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)
