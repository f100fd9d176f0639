"""Benchmark presets: a model shape (written once as a random-weight Hugging Face checkpoint that both
sides load), a batch, a precision, and the methods compared."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    dtype: str = "float32"
    # Activation checkpointing on both sides (transformers' gradient checkpointing), and compile on ours.
    checkpointing: bool = False
    compile: bool = False
    methods: tuple[str, ...] = ("full", "lora", "qlora_bnb")
    # A named flavor built from the seeded initialisation instead of a checkpoint: ours only (a 70B
    # checkpoint does not fit a benchmark machine's disk, and transformers quantizes only while loading one).
    flavor: str | None = None
    # A mixture of experts (a Qwen3-MoE checkpoint) when experts > 0: every layer's MLP is `experts` SwiGLUs of
    # hidden size moe_ffn, top_k per token. transformers' side then runs once per experts implementation.
    experts: int = 0
    top_k: int = 2
    moe_ffn: int = 0
    theirs_experts: tuple[str, ...] = ("eager", "grouped_mm")
    # model.* overrides of the flavor (ours only): a published shape with fewer layers, to fit one GPU.
    model_overrides: tuple[str, ...] = ()


PRESETS = {
    # The smallest: the test suite runs it so that the benchmark cannot rot.
    "tiny": Preset(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=192, vocab=512, seq=64, batch=2,
                   methods=("full", "lora")),
    # Mixtures of experts (Qwen3-MoE, the load-balancing loss on both sides): the smallest (8 experts, 2 per
    # token), which the test suite runs, and a CPU size like cpu-small's with Qwen3-30B-A3B's proportions
    # (128 experts, 8 per token, each expert's hidden size 0.375 x dim).
    "moe-tiny": Preset(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=192, vocab=512, seq=64, batch=2,
                       methods=("full",), experts=8, moe_ffn=64),
    "cpu-moe": Preset(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn=768, vocab=6016, seq=512, batch=8,
                      methods=("full",), experts=128, top_k=8, moe_ffn=96),
    # About 6.2M parameters, seq 512, batch 8, fp32: the shape of the peer-trainer comparison in issue 14.
    "cpu-small": Preset(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn=768, vocab=6016, seq=512, batch=8),
    # 207M parameters (dim 1024, 12 layers, the Llama 2 vocabulary), seq 512, batch 2, fp32.
    "cpu-207m": Preset(dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, ffn=2816, vocab=32000, seq=512, batch=2),
    "llama3_2_1b": Preset(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192, vocab=128256, seq=8192, batch=1,
                          dtype="bfloat16", checkpointing=True, compile=True),
    "llama3_1_8b": Preset(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256, seq=8192, batch=1,
                          dtype="bfloat16", checkpointing=True, compile=True, methods=("full",)),
    "8b-seeded": Preset(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256, seq=8192, batch=1,
                        dtype="bfloat16", checkpointing=True, compile=True, methods=("full",), flavor="llama3_1_8b"),
    # Long context, ours alone from the seeded init (the flavor's 131,072 positions): 8K and 32K tokens.
    "1b-seeded": Preset(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192, vocab=128256, seq=8192, batch=1,
                        dtype="bfloat16", checkpointing=True, compile=True, methods=("full",), flavor="llama3_2_1b"),
    "1b-32k": Preset(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192, vocab=128256, seq=32768, batch=1,
                     dtype="bfloat16", checkpointing=True, compile=True, methods=("full",), flavor="llama3_2_1b"),
    # Qwen3-30B-A3B's layers (128 experts of 768, 8 per token), 8 of its 48, on one GPU: 5.5B parameters, of
    # which a token meets 0.9B (the whole model's weights, gradients and AdamW state would need 490 GB).
    "moe-30b-a3b-8l": Preset(dim=2048, n_layers=8, n_heads=32, n_kv_heads=4, ffn=6144, vocab=151936, seq=4096, batch=1,
                             dtype="bfloat16", checkpointing=True, compile=True, methods=("full",), experts=128, top_k=8,
                             moe_ffn=768, flavor="qwen3_moe_30b_a3b", model_overrides=("model.n_layers=8",)),
    # Ours alone, from the seeded init (drawn on the GPU in seconds): no 16 GB checkpoint to write first.
    "8b-qlora-nf4": Preset(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256, seq=2048, batch=2,
                           dtype="bfloat16", checkpointing=True, compile=True, methods=("qlora_nf4",), flavor="llama3_1_8b"),
    "8b-qlora": Preset(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn=14336, vocab=128256, seq=2048, batch=2,
                       dtype="bfloat16", checkpointing=True, compile=True, methods=("lora", "qlora_bnb", "qlora_nf4")),
    "70b-qlora": Preset(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn=28672, vocab=128256, seq=2048, batch=1,
                        dtype="bfloat16", checkpointing=True, compile=True, methods=("qlora_nf4",), flavor="llama3_1_70b"),
}

# method -> (our overrides, the transformers side's method or None where it has no equivalent)
METHODS = {
    "full": ([], "full"),
    "lora": (["adapters.kind=lora"], "lora"),
    "qlora_nf4": (["adapters.kind=lora", "adapters.quantize_base=nf4"], None),
    "qlora_bnb": (["adapters.kind=lora", "adapters.quantize_base=bnb_nf4"], "qlora"),
    "qlora_hqq": (["adapters.kind=lora", "adapters.quantize_base=hqq"], None),
}
