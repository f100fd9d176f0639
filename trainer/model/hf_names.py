"""Parameter names: ours <-> Hugging Face LlamaForCausalLM and Qwen3ForCausalLM (the same layout)."""

import re

_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    # Qwen3's per-head query / key norms (Llama has none).
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
}
_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def hf_to_ours(name: str) -> str | None:
    """Our name for an HF tensor name; None for tensors we do not keep (e.g. rotary_emb.inv_freq)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


def ours_to_hf(name: str) -> str:
    for hf, ours in _TOP.items():
        if name == ours:
            return hf
    prefix, layer_id, rest = name.split(".", 2)
    for hf, ours in _LAYER.items():
        if rest == f"{ours}.weight":
            return f"model.layers.{layer_id}.{hf}.weight"
    raise KeyError(f"no Hugging Face name for parameter {name}")
