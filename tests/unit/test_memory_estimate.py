"""--dry-run's per-rank memory estimate follows each layout and AC mode the way it must."""

import torch

from trainer.config import load_config
from trainer.dry_run import estimate_memory
from trainer.plan import make_plan
from trainer.precision import Precision

FP32 = Precision(torch.float32, torch.float32)


def _estimate(world, *overrides):
    cfg = load_config("configs/debug.yaml", ["model.n_layers=8", "training.global_batch_size=-1", *overrides])
    memory = estimate_memory(make_plan(cfg, world), FP32)
    states = sum(v for k, v in memory.items() if k.startswith(("parameters", "gradients", "optimizer")))
    activations = next(v for k, v in memory.items() if k.startswith("activations"))
    return states, activations


def test_sharding_and_checkpointing_shrink_what_they_should():
    states, acts = _estimate(1)
    fsdp_states, fsdp_acts = _estimate(2)
    assert fsdp_states == states / 2 and fsdp_acts == acts  # FSDP shards states, not activations
    tp_states, tp_acts = _estimate(2, "parallel.tp=2")
    assert states / 2 < tp_states < states * 0.51 and tp_acts == acts / 2  # norm gains stay whole
    pp_states, _ = _estimate(2, "parallel.pp=2")
    assert pp_states < states * 0.6
    full = _estimate(1, "activation_checkpoint.mode=full")[1]
    op = _estimate(1, "activation_checkpoint.mode=selective_op")[1]
    layer = _estimate(1, "activation_checkpoint.mode=selective_layer")[1]
    assert full < op < layer < acts
    gpipe = _estimate(2, "parallel.pp=2", "parallel.pp_schedule=gpipe", "parallel.pp_microbatches=4")[1]
    one_f_one_b = _estimate(2, "parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4")[1]
    assert gpipe == 2 * one_f_one_b  # GPipe keeps all 4 microbatches in flight, 1F1B at most pp = 2
    lora_states, lora_acts = _estimate(1, "adapters.kind=lora", "adapters.rank=4")
    # fp32 weights (4 of the 16 bytes per parameter) stay; gradients and AdamW shrink to the adapters.
    assert states / 4 < lora_states < states / 3 and lora_acts == acts


def test_4bit_base_estimate_is_what_the_quantized_model_stores():
    """The estimate's weight bytes against the bytes a real quantized model holds (codes + statistics)."""
    from tests.helpers import build_adapted

    for kind in ("nf4", "bnb_nf4", "hqq"):
        cfg = load_config("configs/debug.yaml", ["adapters.kind=lora", f"adapters.quantize_base={kind}"])
        plan = make_plan(cfg, 1)
        estimate = next(v for k, v in estimate_memory(plan, FP32).items() if k.startswith("parameters"))
        model = build_adapted(plan.model_args, cfg.adapters, None, seed=0)
        held = sum(_bytes(t) for t in [*model.parameters(), *model.buffers()])
        for module in model.modules():
            state = getattr(module, "quant_state", None)
            if state is not None:
                held += sum(_bytes(t) for t in (state.absmax, state.state2.absmax, state.code, state.state2.code))
            held += sum(_bytes(t) for t in getattr(module, "meta", {}).values() if torch.is_tensor(t))
        held -= sum(_bytes(b) for b in model.buffers())  # RoPE tables are not parameters
        assert abs(estimate - held) / held < 0.03, (kind, estimate, held)
        unquantized = make_plan(load_config("configs/debug.yaml", ["adapters.kind=lora"]), 1)
        full = next(v for k, v in estimate_memory(unquantized, FP32).items() if k.startswith("parameters"))
        assert estimate < 0.6 * full  # the blocks shrink about 7x; embeddings and norms stay fp32


def _bytes(t: torch.Tensor) -> int:
    if type(t.data).__name__ == "NF4Tensor":
        nf4 = t.data
        return sum(_bytes(x) for x in (nf4.quantized_data, nf4.quantized_scalers, nf4.quantization_factor))
    return t.numel() * t.element_size()


def test_teacher_estimate_is_what_the_built_teacher_holds(shared):
    """--dry-run's teacher weights against the bytes a real distillation teacher (stories260K) holds, in
    the compute dtype and with each 4-bit backend; the other teacher entries are there too."""
    from trainer.distill import build_teacher

    teacher = shared("models/stories260K/stories260K.bin")
    for kind in ("none", "nf4", "bnb_nf4", "hqq"):
        cfg = load_config("configs/debug.yaml", [
            "tokenizer.kind=auto", f"tokenizer.path={shared('tokenizers/tok512/tok512.model')}",
            f"distill.teacher={teacher}", f"distill.teacher_quantize={kind}", "adapters.hqq_group_size=64"])
        plan = make_plan(cfg, 1)
        memory = estimate_memory(plan, FP32)
        estimate = next(v for k, v in memory.items() if k.startswith("teacher parameters"))
        assert {"teacher logits", "distillation loss, one chunk of 1024 tokens (fp32)"} <= set(memory)
        model = build_teacher(cfg.distill, plan.teacher_args, hqq_group_size=cfg.adapters.hqq_group_size, fsdp_mesh=None,
                              shards=1, precision=FP32, device=torch.device("cpu"))
        held = sum(_bytes(t) for t in model.parameters())
        for module in model.modules():
            state = getattr(module, "quant_state", None)
            if state is not None:
                held += sum(_bytes(t) for t in (state.absmax, state.state2.absmax, state.code, state.state2.code))
            held += sum(_bytes(t) for t in getattr(module, "meta", {}).values() if torch.is_tensor(t))
        assert abs(estimate - held) / held < 0.03, (kind, estimate, held)


def test_context_parallelism_splits_activations_and_states_and_counts_what_it_gathers():
    """cp2: each rank computes half of every sequence (half the activations) and FSDP shards over the cp
    ranks too (half the states); each layer keeps the other half's keys and values, and the boolean mask
    of its queries against every key."""
    states, acts = _estimate(1)
    cp_states, cp_acts = _estimate(2, "parallel.cp=2")
    assert cp_states == states / 2 and cp_acts == acts / 2
    cfg = load_config("configs/debug.yaml", ["model.n_layers=8", "training.global_batch_size=-1", "parallel.cp=2",
                                             "data.attention=document"])
    memory = estimate_memory(make_plan(cfg, 2), FP32)
    kv = 128 // 4 * 2  # debug: dim 128 over 4 heads, 2 kv heads
    # 4 sequences x 256 tokens, the half held elsewhere, keys and values, fp32, 8 layers.
    assert memory["keys and values gathered over cp=2, every layer"] == 4 * 256 / 2 * 2 * kv * 4 * 8
    # Document masks: each rank's 128 queries of 4 sequences against all 256 keys, bool and an fp32 copy.
    mask = "attention mask (queries x keys: bool, and a compute-dtype copy while attending)"
    assert memory[mask] == 4 * 128 * 256 * (1 + 4)
    causal_cp = load_config("configs/debug.yaml", ["parallel.cp=2"])  # on CPU, causal chunks need no mask
    assert mask not in estimate_memory(make_plan(causal_cp, 2), FP32)


def _saved_elements_per_token(args) -> float:
    """What one block of `args` keeps for its backward, per token: the bytes of every distinct tensor autograd
    saves in a forward (weights aside), counted with torch's saved-tensor hooks, over 4 bytes."""
    from models import build_meta_model
    from trainer.weights.placement import fill_from
    from trainer.weights.seeded_init import SeededInit

    model = build_meta_model(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    fill_from(model, SeededInit(args, 0, {n: p.shape for n, p in model.named_parameters()}))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(4, 256, args.dim, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.layers["1"](x, model.rope_cos, model.rope_sin)
    return sum(saved.values()) / x[..., 0].numel() / 4


def test_a_mixture_of_experts_block_saves_what_the_estimate_counts():
    """The MoE family's activation count (per token: the gathered rows, the grouped matmuls' outputs and
    SwiGLU's products per chosen expert, the router's scores, shared experts) against what autograd
    really keeps, for Qwen3-MoE's routing, DeepSeek-V3's, and Qwen3-30B-A3B's proportions (8 of 64)."""
    from models import family_of
    from tests.helpers import flavor_args

    for flavor, fields in (("qwen3_moe_debug", {}), ("qwen3_moe_debug_dsv3", {}),
                           ("qwen3_moe_debug", {"num_experts": 64, "top_k": 8, "moe_hidden_dim": 48})):
        args = flavor_args(flavor, vocab_size=512, **fields)
        measured = _saved_elements_per_token(args)
        estimate = family_of(args).activation_elements(args, "none", 1)
        print(f"\nMoE block {flavor} {fields}: saves {measured:.0f} elements per token, estimate {estimate:.0f}")
        assert abs(estimate - measured) / measured < 0.1


def test_expert_parallelism_gathers_a_rank_s_own_experts_only():
    cfg = load_config("configs/debug.yaml", ["model.flavor=qwen3_moe_debug", "training.global_batch_size=-1"])
    ep1 = estimate_memory(make_plan(cfg, 4), FP32)
    cfg = load_config("configs/debug.yaml", ["model.flavor=qwen3_moe_debug", "training.global_batch_size=-1", "parallel.ep=4"])
    ep4 = estimate_memory(make_plan(cfg, 4), FP32)
    gathered = "gathered parameters in flight"
    assert ep4[gathered] < 0.5 * ep1[gathered]  # the experts are most of a block
    assert {k: v for k, v in ep4.items() if k != gathered} == {k: v for k, v in ep1.items() if k != gathered}


def test_gradients_replace_activations_in_a_single_backward():
    """With one backward per step the blocks' gradients appear as their activations are freed: the peak
    holds either the activations (and the output layer's gradient) or all the gradients, not both; with
    gradient accumulation (or pipeline microbatches) the earlier microbatches' gradients are held too."""
    from trainer.dry_run import NOT_AT_ONCE

    def memory(*overrides):
        cfg = load_config("configs/debug.yaml", ["model.n_layers=8", *overrides])
        return estimate_memory(make_plan(cfg, 1), FP32)

    one = memory("training.global_batch_size=-1")
    grads = one["gradients (fp32, trainable only)"]
    head = 4 * 128 * 320  # debug: dim 128, the byte vocabulary padded to 320, untied
    assert one[NOT_AT_ONCE] == -(grads - head)  # activations (0.09 GiB) far exceed the gradients
    assert NOT_AT_ONCE not in memory()  # global batch 8 = 2 microbatches of 4
    lora = memory("training.global_batch_size=-1", "adapters.kind=lora")
    assert lora[NOT_AT_ONCE] == -lora["gradients (fp32, trainable only)"]  # the head trains no adapter
