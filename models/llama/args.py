"""The shape of a Llama 2 / 3 decoder."""

from dataclasses import dataclass

from models.common.args import DecoderArgs, swiglu_hidden


@dataclass(frozen=True, kw_only=True)
class LlamaArgs(DecoderArgs):
    family = "llama"

    # The SwiGLU hidden size; when None it follows Meta's rule from multiple_of / ffn_dim_multiplier.
    ffn_hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return swiglu_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @classmethod
    def from_fields(cls, fields: dict) -> "LlamaArgs":
        # Checkpoints written before each family had its own args carry the shared ModelArgs' fields.
        fields = dict(fields)
        if fields.pop("qk_norm", False) or fields.pop("attention_head_dim", None) is not None:
            raise ValueError("a Llama shape has no QK-norm and no head size of its own (another family's shape?)")
        return super().from_fields(fields)
