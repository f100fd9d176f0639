"""Named Llama shapes. vocab_size -1 means: the tokenizer's, padded to a multiple of 64.

The Llama 3.x shapes are those Meta published (hidden sizes follow from multiple_of and
ffn_dim_multiplier: 8192, 8192, 14336, 28672 and 53248).
"""

from models.common.rope import RopeScaling

_LLAMA3_1_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA3_2_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072)

FLAVORS: dict[str, dict] = {
    # CPU-sized: trains a few steps a second on two cores; GQA (4 query heads share 2 kv heads).
    "debug": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, max_seq_len=1024),
    "llama3_2_1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA3_2_ROPE, tie_embeddings=True, **_LLAMA3,
    ),
    "llama3_2_3b": dict(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA3_2_ROPE, tie_embeddings=True, **_LLAMA3,
    ),
    "llama3_1_8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA3_1_ROPE, **_LLAMA3,
    ),
    "llama3_1_70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA3_1_ROPE, **_LLAMA3,
    ),
    "llama3_1_405b": dict(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.2,
        rope_scaling=_LLAMA3_1_ROPE, **_LLAMA3,
    ),
}
