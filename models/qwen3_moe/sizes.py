"""What the Qwen3-MoE family answers about its blocks beyond their modules: initialisation, FLOPs per
token (the active parameters only: a token passes through top_k experts, not all of them), activation
memory, and the sizes tensor parallelism splits. Dense layers answer as the dense families do."""

from models.common import dense
from models.qwen3_moe.args import Qwen3MoEArgs

# adapters.targets short names: the dense ones (attention, and the dense layers' MLPs), plus the router, the
# routed experts (every expert's projections: trainer/adapters/experts.py) and the shared experts' linears.
ADAPTER_TARGETS = {**dense.ADAPTER_TARGETS, "router": r"layers\.\d+\.moe\.router",
                   "experts": r"layers\.\d+\.moe\.experts", "shared": r"layers\.\d+\.moe\.shared\.w[123]"}


def init_std(name: str, args: Qwen3MoEArgs) -> float | None:
    if name.endswith(("moe.experts.w2", "moe.shared.w2.weight")):
        return 0.02 / (2 * args.n_layers) ** 0.5  # residual-branch outputs, as the dense w2
    if ".moe." in name:
        return 0.02
    return dense.init_std(name, args)


def _attention_params(a: Qwen3MoEArgs) -> int:
    return 2 * a.dim * a.n_heads * a.head_dim + 2 * a.dim * a.n_kv_heads * a.head_dim + 2 * a.dim


def active_ffn_params(a: Qwen3MoEArgs, layer_id: int) -> int:
    """Weights a token's feed-forward multiplies by in a layer: its router, its top_k experts and the
    shared ones in a MoE layer; the whole SwiGLU in a dense one."""
    if not a.is_moe_layer(layer_id):
        return 3 * a.dim * a.ffn_hidden_dim
    return a.dim * a.num_experts + 3 * a.dim * a.moe_hidden_dim * (a.top_k + a.shared_experts)


def flops_per_token(a: Qwen3MoEArgs, seq_len: int) -> int:
    """6 x the active matmul parameters + attention's 12 x layers x dim x seq_len, as the dense count."""
    matmul = sum(_attention_params(a) + active_ffn_params(a, i) for i in range(a.n_layers)) + a.dim + a.vocab_size * a.dim
    return 6 * matmul + 12 * a.n_layers * a.dim * seq_len


def _moe_elements(a: Qwen3MoEArgs, mode: str) -> float:
    """Elements a MoE feed-forward saves per token: per chosen expert the gathered input, its gate, up and
    product (and silu's input), its output and the weighted output; the router's logits and
    probabilities; the shared experts' SwiGLU like a dense one."""
    k, hidden, shared = a.top_k, a.moe_hidden_dim, a.moe_hidden_dim * a.shared_experts
    if mode == "selective_op":  # matmul outputs only
        return k * (2 * hidden + a.dim) + a.num_experts + 2 * shared + (a.dim if shared else 0)
    return k * (4 * hidden + 3 * a.dim) + 3 * a.num_experts + 4 * shared + (2 * a.dim if shared else 0)


def activation_elements(a: Qwen3MoEArgs, mode: str, every: int) -> float:
    """Per token, averaged over the layers (dense and MoE ones save different amounts)."""
    dense_block = dense.activation_elements(a, mode, every)
    if mode == "full":
        return dense_block
    if mode == "selective_layer":
        return (a.dim + (every - 1) * activation_elements(a, "none", 1)) / every
    # The dense block's count less its SwiGLU's hidden-size tensors, plus the mixture's.
    swiglu = (2 if mode == "selective_op" else 4) * a.hidden_dim
    moe_block = dense_block - swiglu + _moe_elements(a, mode)
    moe = len(a.moe_layers)
    return (moe * moe_block + (a.n_layers - moe) * dense_block) / a.n_layers


def tp_sizes(a: Qwen3MoEArgs) -> dict[str, int]:
    return {"n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "ffn_hidden_dim": a.hidden_dim}


def check_layout(a: Qwen3MoEArgs, dims) -> str | None:
    if a.num_experts % dims.expert_split:
        split = f"parallel.ep={dims.ep}" if dims.tp == 1 else f"parallel.ep x tp = {dims.ep} x {dims.tp}"
        return (f"{split} does not divide the model's {a.num_experts} experts (the ranks that split them: the tp "
                f"ranks split an ep rank's experts further): pick sizes whose product divides num_experts")
    return None
