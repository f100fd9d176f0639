"""Importing llama2.c checkpoints (karpathy's "legacy" version-0 export, e.g. stories260K.bin).

Layout (little-endian): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
then float32 tensors stacked over layers in a fixed order, then the RoPE tables. A negative vocab_size
means an untied classifier follows at the end.
"""

import struct
from pathlib import Path

import numpy as np
import torch

from trainer.model.args import ModelArgs
from trainer.model.llama import Transformer
from trainer.weights.hf_import import CheckpointError
from trainer.weights.placement import copy_full_into

_HEADER = struct.Struct("<7i")


def _read_header(path: Path) -> tuple[int, ...]:
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"{path}: too short for a llama2.c header ({len(raw)} bytes)")
    return _HEADER.unpack(raw)


def looks_like_llama2c(path: Path) -> bool:
    if not path.is_file() or path.suffix != ".bin":
        return False
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _read_header(path)
    # The newer exports start with the magic 0x616b3432 ("ak42") instead of a plausible shape.
    return all(0 < v < 1 << 20 for v in (dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len))


def read_llama2c_args(path: Path) -> ModelArgs:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _read_header(path)
    if dim == 0x616B3432:
        raise CheckpointError(
            f"{path}: a llama2.c version-1/2 export; only the legacy (version 0) format is read: "
            f"re-export with llama2.c's export.py --version 0"
        )
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
        ffn_hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=vocab > 0,
    )


def _to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (2i, 2i+1); we rotate halves (i, i + head_dim/2): regroup each head's rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


@torch.no_grad()
def load_llama2c_weights(model: Transformer, path: Path) -> None:
    a = read_llama2c_args(path)
    if a != model.args:
        raise CheckpointError(f"{path}: the checkpoint's shape {a} differs from the model's {model.args}")
    L, d, kv, h, V = a.n_layers, a.dim, a.n_kv_heads * a.head_dim, a.hidden_dim, a.vocab_size
    layout = [
        ("tok_embeddings", (V, d)), ("attention_norm", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv, d)),
        ("wv", (L, kv, d)), ("wo", (L, d, d)), ("ffn_norm", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)),
        ("w3", (L, h, d)), ("norm", (d,)), ("freqs_cos", (a.max_seq_len, a.head_dim // 2)),
        ("freqs_sin", (a.max_seq_len, a.head_dim // 2)),
    ]
    if not a.tie_embeddings:
        layout.append(("output", (V, d)))
    expected = _HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    size = path.stat().st_size
    if size != expected:
        raise CheckpointError(f"{path}: {size} bytes, but a llama2.c file of this header holds {expected}; truncated?")

    data = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER.size)
    tensors, offset = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        tensors[name] = torch.from_numpy(np.array(data[offset : offset + n])).view(shape)
        offset += n

    full = {"tok_embeddings.weight": tensors["tok_embeddings"], "norm.weight": tensors["norm"]}
    if not a.tie_embeddings:
        full["output.weight"] = tensors["output"]
    per_layer = {
        "attention_norm": "attention_norm", "ffn_norm": "ffn_norm", "wq": "attention.wq", "wk": "attention.wk",
        "wv": "attention.wv", "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
        "w3": "feed_forward.w3",
    }
    for i in range(L):
        for src, dst in per_layer.items():
            w = tensors[src][i]
            if src == "wq":
                w = _to_rotate_half(w, a.n_heads)
            elif src == "wk":
                w = _to_rotate_half(w, a.n_kv_heads)
            full[f"layers.{i}.{dst}.weight"] = w
    # A pipeline stage holds only some of these; adapter parameters are none of them.
    for name, param in model.named_parameters():
        if name in full:
            copy_full_into(param, full[name])
