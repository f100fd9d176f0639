"""Named Qwen3 (dense) shapes: a head size of 128 at every width, QK-norm, rope theta 1e6, 151,936 tokens,
40,960 positions; the small ones tie their embeddings (the published configs). vocab_size -1 means: the
tokenizer's, padded to a multiple of 64."""

_QWEN3 = dict(head_dim=128, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960)

FLAVORS: dict[str, dict] = {
    # CPU-sized: its head size (64) is not dim / n_heads (32), as in the real ones.
    "qwen3_debug": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_hidden_dim=352, vocab_size=-1,
                        max_seq_len=1024, norm_eps=1e-6, rope_theta=1000000.0),
    "qwen3_0_6b": dict(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=3072, tie_embeddings=True, **_QWEN3),
    "qwen3_1_7b": dict(dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_hidden_dim=6144, tie_embeddings=True, **_QWEN3),
    "qwen3_4b": dict(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=9728, tie_embeddings=True, **_QWEN3),
    "qwen3_8b": dict(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_hidden_dim=12288, **_QWEN3),
    "qwen3_14b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_hidden_dim=17408, **_QWEN3),
    "qwen3_32b": dict(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_hidden_dim=25600, **_QWEN3),
}
