"""Named Qwen3-MoE shapes: the published Qwen3-30B-A3B and Qwen3-235B-A22B (128 experts, 8 per token,
every layer a mixture, the load-balancing loss at 0.001), and CPU-sized ones. vocab_size -1 means: the
tokenizer's, padded to a multiple of 64."""

_QWEN3_MOE = dict(head_dim=128, vocab_size=151936, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                  num_experts=128, top_k=8, norm_topk_prob=True, router_aux_loss_coef=0.001)
_DEBUG = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden_dim=352, moe_hidden_dim=64,
              vocab_size=-1, max_seq_len=1024, norm_eps=1e-6, rope_theta=1000000.0)

FLAVORS: dict[str, dict] = {
    # CPU-sized: 8 experts, 2 per token, every layer a mixture.
    "qwen3_moe_debug": dict(num_experts=8, top_k=2, **_DEBUG),
    # The same with DeepSeek-V3-style routing: sigmoid scores, 4 groups of which 2 may be chosen, a shared
    # expert, the balancing bias instead of the loss, and a first dense layer (as DeepSeek-V3's first three).
    "qwen3_moe_debug_dsv3": dict(num_experts=8, top_k=2, score_func="sigmoid", groups=4, topk_groups=2,
                                 routed_scaling_factor=2.5, expert_bias=True, shared_experts=1, mlp_only_layers=(0,),
                                 router_aux_loss_coef=0.0, **_DEBUG),
    "qwen3_moe_30b_a3b": dict(dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, ffn_hidden_dim=6144, moe_hidden_dim=768,
                              **_QWEN3_MOE),
    "qwen3_moe_235b_a22b": dict(dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, ffn_hidden_dim=12288,
                                moe_hidden_dim=1536, **_QWEN3_MOE),
}
