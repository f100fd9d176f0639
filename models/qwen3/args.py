"""The shape of a Qwen3 dense decoder: a head size of its own (128 at every published size, so
n_heads x head_dim need not equal dim) and an explicit MLP hidden size."""

from dataclasses import dataclass

from models.common.args import DecoderArgs, swiglu_hidden


@dataclass(frozen=True, kw_only=True)
class Qwen3Args(DecoderArgs):
    family = "qwen3"

    head_dim: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 1000000.0

    @property
    def hidden_dim(self) -> int:
        return self.ffn_hidden_dim

    @classmethod
    def from_fields(cls, fields: dict) -> "Qwen3Args":
        # Checkpoints written before each family had its own args carry the shared ModelArgs' fields:
        # attention_head_dim, qk_norm (always true for Qwen3), and Meta's hidden-size rule.
        fields = dict(fields)
        fields.pop("qk_norm", None)
        if "attention_head_dim" in fields:
            fields["head_dim"] = fields.pop("attention_head_dim")
        multiple_of, multiplier = fields.pop("multiple_of", 256), fields.pop("ffn_dim_multiplier", None)
        if fields.get("ffn_hidden_dim") is None:
            fields["ffn_hidden_dim"] = swiglu_hidden(fields["dim"], multiple_of, multiplier)
        return super().from_fields(fields)
