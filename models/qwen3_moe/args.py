"""The shape of a Qwen3-MoE decoder: Qwen3's attention (its own head size, QK-norm), and a feed-forward
that is a mixture of experts in most layers, a dense SwiGLU in the others. The routing fields beyond
Qwen3-MoE's own (score_func sigmoid, groups, shared experts, expert bias) give DeepSeek-V3-style routing
on the same blocks."""

from dataclasses import dataclass

from models.common.router import Routing
from models.qwen3.args import Qwen3Args


@dataclass(frozen=True, kw_only=True)
class Qwen3MoEArgs(Qwen3Args):
    family = "qwen3_moe"

    num_experts: int
    top_k: int  # experts per token (num_experts_per_tok)
    moe_hidden_dim: int  # each expert's SwiGLU hidden size (moe_intermediate_size); ffn_hidden_dim is the dense layers'
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1  # layer i is a MoE layer when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (DeepSeek-V3: its first 3 layers)
    router_aux_loss_coef: float = 0.001  # the load-balancing loss's weight (0: none)
    # DeepSeek-V3-style routing (models/common/router.py); the defaults are Qwen3-MoE's.
    score_func: str = "softmax"
    groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    expert_bias: bool = False
    shared_experts: int = 0

    def __post_init__(self):
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))  # JSON gives a list
        super().__post_init__()
        self.routing  # validates the routing fields
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step {self.decoder_sparse_step} must be at least 1")
        if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
            raise ValueError("no layer is a mixture of experts (decoder_sparse_step / mlp_only_layers)")

    @property
    def routing(self) -> Routing:
        return Routing(num_experts=self.num_experts, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob,
                       score_func=self.score_func, groups=self.groups, topk_groups=self.topk_groups,
                       scaling=self.routed_scaling_factor, expert_bias=self.expert_bias,
                       shared_experts=self.shared_experts)

    def is_moe_layer(self, layer_id: int) -> bool:
        """transformers' rule for Qwen3-MoE."""
        return layer_id not in self.mlp_only_layers and (layer_id + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def hf_compatible(self) -> str | None:
        """Why transformers' Qwen3MoeForCausalLM cannot hold this shape (None: it can)."""
        extra = [name for name, default in (("score_func", "softmax"), ("groups", 1), ("routed_scaling_factor", 1.0),
                                            ("expert_bias", False), ("shared_experts", 0)) if getattr(self, name) != default]
        if extra:
            return f"DeepSeek-V3-style routing ({', '.join(f'{n}={getattr(self, n)}' for n in extra)}) has no place in its config"
        return None
