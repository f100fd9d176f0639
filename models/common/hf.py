"""What Hugging Face's dense decoders (LlamaForCausalLM, Qwen3ForCausalLM) share: the parameter-name
layout and the config.json fields of the shape. Each family builds its own table and translation from
these and adds what is its own."""

import re

import torch

from models.common.rope import RopeScaling

TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# HF module name inside model.layers.{i} -> ours inside layers.{i}.
DENSE_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


class NameTable:
    """Parameter names both ways: ours <-> Hugging Face's, for one family's layout."""

    def __init__(self, layer: dict[str, str], top: dict[str, str] = TOP_NAMES):
        self.layer, self.top = layer, top
        self._ours_to_hf_layer = {ours: hf for hf, ours in layer.items()}
        self._ours_to_hf_top = {ours: hf for hf, ours in top.items()}

    def from_hf(self, name: str) -> str | None:
        """Our name for an HF tensor name; None for tensors we do not keep (e.g. rotary_emb.inv_freq)."""
        if name in self.top:
            return self.top[name]
        m = _LAYER_RE.fullmatch(name)
        if m and m.group(2) in self.layer:
            return f"layers.{m.group(1)}.{self.layer[m.group(2)]}.weight"
        return None

    def to_hf(self, name: str) -> str:
        if name in self._ours_to_hf_top:
            return self._ours_to_hf_top[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[2].endswith(".weight"):
            hf = self._ours_to_hf_layer.get(parts[2].removesuffix(".weight"))
            if hf is not None:
                return f"model.layers.{parts[1]}.{hf}.weight"
        raise KeyError(f"no Hugging Face name for parameter {name}")


def rope_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    """(theta, Llama 3.1 scaling or None) of an HF config; ValueError for a rope type we do not train."""
    # transformers >= 5 keeps theta and scaling in rope_parameters; older files use rope_theta/rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope type {rope_type!r} is not supported (default, llama3)")
    return theta, RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_seq_len=int(rope["original_max_position_embeddings"]),
    )


def dense_fields_from_hf(cfg: dict) -> dict:
    """The shared fields of a dense decoder's args from an HF config (KeyError for a missing one;
    ValueError for what no dense family here trains)."""
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("attention/MLP biases are not part of the dense decoders we train")
    theta, scaling = rope_from_hf(cfg)
    n_heads = cfg["num_attention_heads"]
    return dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=cfg.get("max_position_embeddings", 2048), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def dense_hf_config(args, *, config_class: str, architecture: str, dtype: torch.dtype, bos_id: int | None,
                    eos_id: int | None, **extra) -> dict:
    """config.json of a dense decoder, written by the installed transformers' own config class (whose
    version decides the file's layout); `extra`: the family's own fields of that class."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope.update(
            rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_seq_len,
        )
    config = getattr(transformers, config_class)(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings, rope_parameters=rope, bos_token_id=bos_id, eos_token_id=eos_id,
        **extra,
    )
    config.architectures = [architecture]
    out = config.to_dict()
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


class StackedExperts:
    """Expert weights that we stack (experts first, one tensor per projection) and Hugging Face checkpoints
    store one per expert (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`: what the Hub holds and what
    transformers' save_pretrained writes); transformers' in-memory fused layout (`mlp.experts.gate_up_proj`,
    gate rows then up rows, and `mlp.experts.down_proj`) is read as well. The many-to-one seam of an
    HFFormat (its `joined`)."""

    _PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    _FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
    _OURS = re.compile(r"layers\.(\d+)\.moe\.experts\.(w1|w2|w3)")
    _HF = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

    def claims(self, hf_name: str) -> bool:
        """Whether an HF tensor is one of the pieces of ours (and so needs no name of its own)."""
        return bool(self._PER_EXPERT.fullmatch(hf_name) or self._FUSED.fullmatch(hf_name))

    def sources(self, name: str, shape: torch.Size, available) -> list[str] | None:
        """The HF tensors our `name` is made of (the per-expert ones unless only the fused one is there);
        None when `name` is not a stacked expert weight."""
        m = self._OURS.fullmatch(name)
        if m is None:
            return None
        layer, ours = m.groups()
        per_expert = [f"model.layers.{layer}.mlp.experts.{e}.{self._HF[ours]}.weight" for e in range(shape[0])]
        fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if ours == 'w2' else 'gate_up_proj'}"
        return [fused] if per_expert[0] not in available and fused in available else per_expert

    def join(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) > 1 or parts[0].dim() == 2:  # one tensor per expert
            return torch.stack(parts)
        fused = parts[0]
        if name.endswith("w2"):
            return fused
        gate, up = fused.chunk(2, dim=1)
        return gate if name.endswith("w1") else up

    def hf_module(self, name: str) -> str:
        """transformers' experts module (what peft's target_parameters name) of our `layers.{i}.moe.experts`."""
        layer = re.fullmatch(r"layers\.(\d+)\.moe\.experts", name).group(1)
        return f"model.layers.{layer}.mlp.experts"

    def split(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        """(HF name, tensor) per expert for a stacked weight of ours; None for any other tensor."""
        m = self._OURS.fullmatch(name)
        if m is None:
            return None
        layer, ours = m.groups()
        return [(f"model.layers.{layer}.mlp.experts.{e}.{self._HF[ours]}.weight", tensor[e]) for e in range(tensor.shape[0])]
