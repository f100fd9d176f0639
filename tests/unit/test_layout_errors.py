"""Impossible parallel layouts are refused by --dry-run (the same checks as training) with a message."""

import pytest

import train

CASES = {
    "world size": (4, ["parallel.tp=3"], "pp x dp_replicate x tp = 1 x 1 x 3 = 3 do not divide the world size 4"),
    "explicit sizes": (4, ["parallel.dp_shard=3"], "= 3 do not multiply to the world size 4"),
    "tp vs kv heads": (4, ["parallel.tp=4"], "parallel.tp=4 does not divide the model's n_kv_heads=2"),
    "tp vs heads": (8, ["parallel.tp=8"], "parallel.tp=8 does not divide the model's n_heads=4"),
    "pp over layers": (8, ["parallel.pp=8", "training.local_batch_size=8"], "makes 8 pipeline stages, more than the model's 4 layers"),
    "interleaved stages over layers": (4, ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b", "training.local_batch_size=8"], "makes 8 pipeline stages"),
    "microbatches": (2, ["parallel.pp=2", "parallel.pp_microbatches=3"], "parallel.pp_microbatches=3 does not divide training.local_batch_size=4"),
    "interleaved microbatches": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_microbatches=1"], "needs parallel.pp_microbatches (1) to be a multiple of pp (2)"),
    "tied embeddings": (2, ["parallel.tp=2", "model.tie_embeddings=true"], "tied embeddings (model.tie_embeddings) cannot be split"),
    "loss parallel vocab": (2, ["parallel.tp=2", "model.vocab_size=259"], "shards the vocabulary (259) over tp=2"),
    "async tp": (2, ["parallel.tp=2", "parallel.async_tp=true"], "parallel.async_tp needs CUDA, parallel.tp > 1 and compile.enabled=true"),
    "streams": (4, ["data.num_streams=6", "training.local_batch_size=2"], "data.num_streams=6 is not a multiple of the data-parallel size 4"),
    "bad schedule": (2, ["parallel.pp=2", "parallel.pp_schedule=zb"], "parallel.pp_schedule='zb' is not one of: gpipe, 1f1b, interleaved_1f1b"),
    "4-bit without adapters": (1, ["adapters.quantize_base=nf4"], "adapters.quantize_base=nf4 quantizes the frozen base under adapters: set adapters.kind"),
    "4-bit with tp": (2, ["adapters.kind=lora", "adapters.quantize_base=nf4", "parallel.tp=2"], "adapters.quantize_base=nf4 with parallel.tp > 1 is not supported"),
    "unknown 4-bit": (1, ["adapters.kind=lora", "adapters.quantize_base=int4"], "adapters.quantize_base='int4' is not one of: none, nf4, bnb_nf4, hqq"),
    "nf4 shards": (4, ["adapters.kind=lora", "adapters.quantize_base=nf4", "model.ffn_hidden_dim=90", "training.local_batch_size=2"],
                   "layers.0.feed_forward.w1 (90, 128) does not split into 4 FSDP shards of whole NF4 blocks"),
    "nf4 replicated": (2, ["adapters.kind=lora", "adapters.quantize_base=nf4", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
                       "adapters.quantize_base=nf4 with parallel.dp_replicate > 1 and dp_shard=1 (pure replication) is not supported"),
    "nf4 block": (1, ["adapters.kind=dora", "adapters.quantize_base=nf4", "model.dim=72"], "layers.0.attention.wk (36, 72) has 2592 weights, not a multiple of NF4's block of 64"),
    "hqq group": (1, ["adapters.kind=lora", "adapters.quantize_base=hqq", "adapters.hqq_group_size=48"],
                  "layers.0.attention.wq (128, 128) has 16384 weights, not an even number of groups of adapters.hqq_group_size=48"),
    "hqq group size": (1, ["adapters.kind=lora", "adapters.quantize_base=hqq", "adapters.hqq_group_size=0"], "adapters.hqq_group_size=0 must be at least 1"),
    "ac mode": (1, ["activation_checkpoint.mode=some"], "activation_checkpoint.mode='some' is not one of: none, full"),
    "unknown converter": (1, ["model.converters=[gptq]"], "model.converters: 'gptq' is not a converter (one of: float8, qat, adapters)"),
    "qat named but off": (1, ["model.converters=[qat]"], "model.converters names qat, which its settings leave off: set qat.scheme"),
    "converter off": (1, ["model.converters=[float8]"], "model.converters names float8, which its settings leave off: set fp8.enabled=true"),
    "converter order": (1, ["fp8.enabled=true", "fp8.emulate=true", "adapters.kind=lora", "model.converters=[adapters,float8]"],
                        "float8 must come before adapters (adapters wraps the layers float8 converts)"),
    # Mixtures of experts (parallel.ep, the moe section).
    "ep over dp_shard": (4, ["model.flavor=qwen3_moe_debug", "parallel.ep=3", "parallel.dp_shard=4", "training.local_batch_size=2"],
                         "parallel.ep=3 must divide parallel.dp_shard=4"),
    "ep over experts": (8, ["model.flavor=qwen3_moe_debug", "model.num_experts=12", "parallel.ep=8", "training.local_batch_size=1"],
                        "parallel.ep=8 does not divide the model's 12 experts"),
    "ep on a dense model": (2, ["parallel.ep=2"], "parallel.ep=2 splits a model's experts, and the llama model has none"),
    "ep x tp over experts": (4, ["model.flavor=qwen3_moe_debug", "model.num_experts=6", "parallel.ep=2", "parallel.tp=2"],
                             "parallel.ep x tp = 2 x 2 does not divide the model's 6 experts"),
    "compile with tp over experts": (2, ["model.flavor=qwen3_moe_debug", "parallel.tp=2", "compile.enabled=true"],
                                     "compile.enabled=true with parallel.tp=2 over a mixture of experts is not supported yet"),
    "adapter dropout over experts": (1, ["model.flavor=qwen3_moe_debug", "adapters.kind=lora", "adapters.targets=[experts]",
                                         "adapters.dropout=0.1"], "adapters.dropout=0.1 cannot apply"),
    "4-bit experts": (1, ["model.flavor=qwen3_moe_debug", "adapters.kind=lora", "adapters.targets=[experts,q]",
                          "adapters.dropout=0", "adapters.quantize_base=nf4"], "which adapters.quantize_base=nf4 does not quantize"),
    "DoRA over experts to peft": (1, ["model.flavor=qwen3_moe_debug", "adapters.kind=dora", "adapters.targets=[experts]",
                                      "adapters.dropout=0", "export.peft=true"], "peft loads over linear layers only"),
    "aux loss over stages": (2, ["model.flavor=qwen3_moe_debug", "parallel.pp=2"], "the load-balancing loss (coefficient 0.001) spans every MoE layer"),
    "aux loss on a dense model": (1, ["moe.aux_loss_coef=0.01"], "moe.aux_loss_coef=0.01 is set, but the llama model has no experts"),
    "moe field on a dense model": (1, ["model.num_experts=8"], "model.num_experts is not a field of the llama family's shape"),
    "top_k over experts": (1, ["model.flavor=qwen3_moe_debug", "model.top_k=9"], "top_k 9 must be between 1 and the number of experts (8)"),
    "export of DeepSeek-V3 routing": (1, ["model.flavor=qwen3_moe_debug_dsv3", "export.hf=true"],
                                      "export.hf / export.peft: this model cannot be written as a Qwen3MoeForCausalLM checkpoint: DeepSeek-V3-style routing"),
    "converter left out": (1, ["fp8.enabled=true", "fp8.emulate=true", "adapters.kind=lora", "model.converters=[float8]"],
                           "model.converters=['float8'] leaves out adapters, which its settings turn on"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_layout(capsys, case):
    world, overrides, expected = CASES[case]
    code = train.main(["--config", "configs/debug.yaml", "--dry-run", "--world-size", str(world), *overrides])
    err = capsys.readouterr().err
    assert code == train.EXIT_USER_ERROR and expected in err, err


def test_missing_quantization_library(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "hqq", None)  # what Python does when hqq is not installed
    code = train.main(["--config", "configs/debug.yaml", "--dry-run", "adapters.kind=lora", "adapters.quantize_base=hqq"])
    err = capsys.readouterr().err
    assert code == train.EXIT_USER_ERROR and "adapters.quantize_base=hqq needs the hqq package: pip install hqq" in err, err


def test_a_4bit_teacher_that_does_not_shard_is_refused(capsys, shared):
    code = train.main(["--config", "configs/debug.yaml", "--dry-run", "--world-size", "8", "training.local_batch_size=1",
                       "tokenizer.kind=auto", f"tokenizer.path={shared('tokenizers/tok512/tok512.model')}",
                       f"distill.teacher={shared('models/stories260K/stories260K.bin')}", "distill.teacher_quantize=nf4"])
    err = capsys.readouterr().err
    assert code == train.EXIT_USER_ERROR and (
        "distill.teacher_quantize=nf4: layers.0.feed_forward.w1 (172, 64) does not split into 8 FSDP shards of whole "
        "NF4 blocks (64 weights); change parallel.dp_shard, or use another distill.teacher_quantize") in err, err
