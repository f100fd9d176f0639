"""What every family's args dataclass has: the fields the rest of the code reads (the vocabulary, the
longest sequence, the width and depth, whether the head shares the embedding) and the JSON that
checkpoints carry so that `model.init_from=<checkpoint>` can rebuild the shape. A family subclasses it
with its own fields; nothing outside the family reads those."""

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from models.common.rope import RopeScaling


@dataclass(frozen=True, kw_only=True)
class DecoderArgs:
    family: ClassVar[str]  # the registry name of the family whose args these are

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim {self.head_dim} must be even for RoPE")
        if self.vocab_size < 1:
            raise ValueError(f"model vocab_size {self.vocab_size} must be positive")

    # A family's args also answer head_dim (per attention head) and hidden_dim (the MLP's), as a field or
    # a property.

    def to_json(self) -> str:
        return json.dumps({"family": self.family, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_fields(cls, fields: dict) -> "DecoderArgs":
        """From the fields of to_json (the family name already taken out), rope scaling as a dict."""
        fields = dict(fields)
        scaling = fields.pop("rope_scaling", None)
        return cls(**fields, rope_scaling=RopeScaling(**scaling) if scaling else None)


def swiglu_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the SwiGLU hidden size: 2/3 of 4 x dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)
