"""Importing llama2.c checkpoints (karpathy's "legacy" version-0 export, e.g. stories260K.bin).

Layout (little-endian): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
then float32 tensors stacked over layers in a fixed order, then the RoPE tables. A negative vocab_size
means an untied classifier follows at the end.
"""

import struct
from pathlib import Path

import numpy as np
import torch

from models.llama.args import LlamaArgs
from trainer.weights.errors import CheckpointError

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


def read_llama2c_args(path: Path) -> LlamaArgs:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _read_header(path)
    if dim == 0x616B3432:
        raise CheckpointError(
            f"{path}: a llama2.c version-1/2 export; only the legacy (version 0) format is read: "
            f"re-export with llama2.c's export.py --version 0"
        )
    return LlamaArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=abs(vocab),
        ffn_hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=seq_len, tie_embeddings=vocab > 0,
    )


def _to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates adjacent pairs (2i, 2i+1); we rotate halves (i, i + head_dim/2): regroup each head's rows."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class Llama2cWeights:
    """The tensors of a llama2.c file by our parameter names, read from a memory map when asked for."""

    def __init__(self, path: Path, args: LlamaArgs, shapes: dict[str, torch.Size]):
        a = read_llama2c_args(path)
        if a != args:
            raise CheckpointError(f"{path}: the checkpoint's shape {a} differs from the model's {args}")
        self.args, self.path, self.names = a, path, set(shapes)
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
        self.arrays, offset = {}, 0
        for name, shape in layout:
            n = int(np.prod(shape))
            self.arrays[name] = data[offset : offset + n].reshape(shape)
            offset += n

    _PER_LAYER = {
        "attention_norm": "attention_norm", "ffn_norm": "ffn_norm", "attention.wq": "wq", "attention.wk": "wk",
        "attention.wv": "wv", "attention.wo": "wo", "feed_forward.w1": "w1", "feed_forward.w2": "w2",
        "feed_forward.w3": "w3",
    }

    def label(self, name: str) -> str:
        return f"{self.path}: tensor {name}"

    def get(self, name: str) -> torch.Tensor:
        if not name.startswith("layers."):
            return torch.from_numpy(np.array(self.arrays[name.removesuffix(".weight")]))
        _, layer, module = name.removesuffix(".weight").split(".", 2)
        src = self._PER_LAYER[module]
        w = torch.from_numpy(np.array(self.arrays[src][int(layer)]))
        if src == "wq":
            w = _to_rotate_half(w, self.args.n_heads)
        elif src == "wk":
            w = _to_rotate_half(w, self.args.n_kv_heads)
        return w

