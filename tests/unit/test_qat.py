"""Quantization-aware training (trainer/qat/): the fake-quantized forward against torchao's own fake
quantizers, which layers round and why the others stay, the start-step switch, QAT under LoRA, and the
model a run's checkpoint reads back as."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.common.linear import product_of
from trainer.build import build_whole_model
from trainer.config import load_config
from trainer.converters import build_converters
from trainer.plan import make_plan
from models.common.moe import GroupedExperts
from trainer.qat.layers import QATEmbedding, QATLinear, QATRounding, round_experts, set_fake_quant
from trainer.qat.schemes import SCHEMES, fake_activations, fake_weight

pytest.importorskip("torchao")
from torchao.quantization import PerRow, quantize_  # noqa: E402
from torchao.quantization.qat import Float8FakeQuantizeConfig, IntxFakeQuantizeConfig, QATConfig  # noqa: E402

GROUP = 32


def _torchao_configs(scheme: str):
    """(activation, weight) fake-quantize configs of torchao for each scheme: its post-training configs'
    own QAT counterparts (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig,
    Float8DynamicActivationFloat8WeightConfig with PerRow), with the int4 group scales in bfloat16 as ours."""
    act8 = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    w4 = IntxFakeQuantizeConfig(torch.int4, group_size=GROUP, is_symmetric=True, scale_precision=torch.bfloat16)
    return {
        "int8_dynact_int4_weight": (act8, w4),
        "int4_weight_only": (None, w4),
        "int8_dynact_int8_weight": (act8, IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)),
        "float8": (Float8FakeQuantizeConfig(granularity=PerRow()), Float8FakeQuantizeConfig(granularity=PerRow())),
    }[scheme]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fake_quantized_linear_equals_torchao(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    linear.weight.data[3, :GROUP] = 0.0  # a group of zeros: the scale's floor, not 0/0
    reference = nn.Sequential(copy.deepcopy(linear))
    activations, weights = _torchao_configs(scheme)
    quantize_(reference, QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
              filter_fn=lambda m, _: isinstance(m, nn.Linear))
    assert type(reference[0]).__name__ == "FakeQuantizedLinear"
    x = (torch.randn(2, 7, 256) * torch.linspace(0.1, 4, 256)).requires_grad_()  # features of unlike sizes
    x_ref = x.detach().clone().requires_grad_()
    ours = F.linear(fake_activations(x, SCHEMES[scheme]), fake_weight(linear.weight, SCHEMES[scheme], GROUP))
    theirs = reference(x_ref)
    print(f"\nQAT {scheme}: max |ours - torchao| = {(ours - theirs).abs().max().item():.1e}")
    assert (ours - theirs).abs().max() <= 1e-6
    assert (ours - F.linear(x, linear.weight)).abs().max() > 1e-3  # and it does round
    ours.square().sum().backward()
    theirs.square().sum().backward()
    if scheme != "float8":  # the same straight-through gradients (float8: see trainer/qat/schemes.py)
        torch.testing.assert_close(linear.weight.grad, reference[0].weight.grad, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fake_quantized_experts_equal_torchao_per_expert(scheme):
    """Stacked experts under QAT (grouped matmul and the reference loop) against each expert built from
    torchao's own fake-quantized linear layers: gate and up on the expert's tokens, down on their SwiGLU."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 64, 96)
    for w in (experts.w1, experts.w2, experts.w3):
        nn.init.normal_(w, std=0.05)
    round_experts(experts, SCHEMES[scheme], GROUP)
    counts = torch.tensor([5, 0, 9, 3])
    x = torch.randn(int(counts.sum()), 64) * torch.linspace(0.1, 4, 64)
    activations, weights = _torchao_configs(scheme)
    by_expert, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, down, up = (nn.Linear(w.shape[2], w.shape[1], bias=False) for w in (experts.w1, experts.w2, experts.w3))
        for linear, w in ((gate, experts.w1), (down, experts.w2), (up, experts.w3)):
            linear.weight.data = w.data[e].clone()
        reference = nn.ModuleDict({"gate": gate, "down": down, "up": up})
        quantize_(reference, QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
                  filter_fn=lambda m, _: isinstance(m, nn.Linear))
        xe = x[start : start + n]
        if n:  # (torchao's per-token rounding takes no empty input)
            by_expert.append(reference["down"](F.silu(reference["gate"](xe)) * reference["up"](xe)))
        start += n
    theirs = torch.cat(by_expert)
    with torch.no_grad():
        ours, loop = experts(x, counts), experts.loop(x, counts)
        experts.rounding.on = False
        plain = experts(x, counts)
    print(f"\nQAT experts {scheme}: max |ours - torchao| = {(ours - theirs).abs().max().item():.1e}")
    assert (ours - theirs).abs().max() <= 1e-6 and (loop - theirs).abs().max() <= 1e-6
    assert (ours - plain).abs().max() > 1e-3


def test_the_config_names_every_export():
    from trainer.config.schema import QUANTIZED_EXPORTS
    from trainer.qat.export import FORMATS

    assert tuple(FORMATS) == QUANTIZED_EXPORTS


@pytest.mark.parametrize("cols", [64, 172])
def test_int4_packing_is_compressed_tensors_own(cols):
    """Against the package's own packer and unpacker, rows whose length is not a multiple of 8 included
    (stories260K's feed-forward has 172 inputs)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    from trainer.qat.export import pack_int4, unpack_int4

    codes = torch.randint(-8, 8, (6, cols), dtype=torch.int8, generator=torch.Generator().manual_seed(cols))
    assert torch.equal(pack_int4(codes), pack_to_int32(codes, 4))
    assert torch.equal(unpack_int4(pack_int4(codes), (6, cols)), codes)
    assert torch.equal(unpack_from_int32(pack_int4(codes), 4, torch.Size([6, cols])), codes)


def test_weights_land_on_the_grid():
    """Each rounded weight is an integer code in range times its group's (or row's) scale."""
    from trainer.qat.schemes import weight_scale

    w = torch.randn(8, 64)
    for name, scheme in SCHEMES.items():
        if scheme.weight == "float8":
            continue
        scale = weight_scale(w, scheme, GROUP).float()
        groups = fake_weight(w, scheme, GROUP).reshape(8, scale.shape[1], -1)
        codes = groups / scale.unsqueeze(-1)
        low, high = (-8, 7) if scheme.weight == "int4" else (-128, 127)
        assert (codes - codes.round()).abs().max() < 1e-4 and codes.min() >= low - 1e-4 and codes.max() <= high + 1e-4, name


def _debug_plan(*overrides: str):
    cfg = load_config("configs/debug.yaml", list(overrides))
    return cfg, make_plan(cfg, 1)


def test_which_layers_round_and_why_the_others_stay():
    _, plan = _debug_plan("qat.scheme=int8_dynact_int4_weight")
    model = plan.meta
    linears = {n for n, m in model.named_modules() if isinstance(m, QATLinear)}
    assert len(linears) == 28 and all(n.startswith("layers.") for n in linears)
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    lines = plan.info.start_lines
    assert lines[0].startswith("qat (int8_dynact_int4_weight: int8 activations per token") and "groups of 32" in lines[0]
    assert "28 layers fake-quantized from the first step" in lines[0]
    assert any("output: the output head (qat.head=false)" in line for line in lines)

    _, plan = _debug_plan("qat.scheme=float8", "qat.head=true", "qat.embeddings=true", "qat.start_step=10")
    assert isinstance(plan.meta.output, QATLinear) and isinstance(plan.meta.tok_embeddings, QATEmbedding)
    assert "30 layers fake-quantized from step 11" in plan.info.start_lines[0]
    assert not plan.chunked_loss  # the chunked loss would multiply by the head's weight itself


def test_start_step_switches_rounding_and_off_is_the_plain_model():
    """Weights only (int4 per group, the head and embeddings too): rounding on is exactly the plain model
    whose weights were rounded beforehand, off is the plain model."""
    cfg, plan = _debug_plan("qat.scheme=int4_weight_only", "qat.head=true", "qat.embeddings=true", "qat.start_step=3")
    converters = build_converters(cfg)
    model = build_whole_model(plan.model_args, converters, init_from=None, seed=0)
    plain = build_whole_model(plan.model_args, [], init_from=None, seed=0)
    rounded = copy.deepcopy(plain)
    for m in rounded.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data = fake_weight(m.weight.data, SCHEMES["int4_weight_only"], GROUP)
    tokens = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step, oracle in ((1, plain), (3, plain), (4, rounded)):
            for converter in converters:
                converter.before_step([model], step)
            assert torch.equal(model(tokens), oracle(tokens)), step


def test_lora_over_a_qat_base_rounds_the_frozen_product_only():
    cfg, plan = _debug_plan("qat.scheme=int8_dynact_int4_weight", "adapters.kind=lora", "adapters.rank=4")
    assert [c.name for c in build_converters(cfg)] == ["qat", "adapters"]
    layer = plan.meta.layers["0"].attention.wq
    assert type(layer).__name__ == "LoRALinear" and isinstance(product_of(layer), QATRounding)
    model = build_whole_model(plan.model_args, build_converters(cfg), init_from=None, seed=0)
    layer = model.layers["0"].attention.wq
    torch.nn.init.normal_(layer.lora_b, std=0.02)
    x = torch.randn(3, 128)
    scheme = SCHEMES["int8_dynact_int4_weight"]
    by_hand = (F.linear(fake_activations(x, scheme), fake_weight(layer.weight, scheme, GROUP))
               + layer.scale * F.linear(F.linear(x, layer.lora_a), layer.lora_b))
    torch.testing.assert_close(layer(x), by_hand, rtol=0, atol=1e-6)
    set_fake_quant(model, False)  # the switch reaches the product the adapter layer took over
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight) + layer.scale * F.linear(F.linear(x, layer.lora_a), layer.lora_b),
                               rtol=0, atol=1e-6)


def test_lora_over_qat_experts_rounds_the_base_then_adds_the_update():
    """Adapters over stacked experts fold their updates into the weights: the frozen base rounds, the update
    is added unrounded, and each projection's input rounds for the whole product."""
    cfg, plan = _debug_plan("model.flavor=qwen3_moe_debug", "qat.scheme=int8_dynact_int4_weight", "qat.group_size=16",
                            "adapters.kind=lora", "adapters.rank=4", "adapters.targets=[experts]", "adapters.dropout=0")
    model = build_whole_model(plan.model_args, build_converters(cfg), init_from=None, seed=0)
    experts = model.layers["0"].moe.experts
    assert type(experts).__name__ == "LoRAExperts" and isinstance(experts.rounding, QATRounding)
    torch.nn.init.normal_(experts.lora_b_gate_up, std=0.02)
    torch.nn.init.normal_(experts.lora_b_down, std=0.02)
    scheme, s = SCHEMES["int8_dynact_int4_weight"], experts.scale
    base = {w: fake_weight(getattr(experts, w).reshape(-1, getattr(experts, w).shape[-1]), scheme, 16).view_as(getattr(experts, w))
            for w in ("w1", "w2", "w3")}
    gate_up = torch.cat([base["w1"], base["w3"]], dim=1) + s * experts.lora_b_gate_up @ experts.lora_a_gate_up
    down = base["w2"] + s * experts.lora_b_down @ experts.lora_a_down
    w1, w3 = gate_up.chunk(2, dim=1)
    counts = torch.tensor([3, 0, 2, 4, 1, 0, 0, 2])
    x = torch.randn(int(counts.sum()), w1.shape[-1])
    with torch.no_grad():
        by_hand = GroupedExperts.loop(experts, x, counts, (w1, down, w3))  # rounds the inputs, not the weights given
        torch.testing.assert_close(experts(x, counts), by_hand, rtol=0, atol=1e-6)
        set_fake_quant(model, False)
        assert not experts.rounding.on and (experts(x, counts) - by_hand).abs().max() > 1e-4


def test_a_quantized_checkpoint_of_another_scheme_is_refused_by_name(tmp_path):
    """We read back the formats we write; any other compressed-tensors scheme (here asymmetric int4) is named,
    with the way out, before a tensor is read."""
    import json

    from trainer.qat.export import FORMATS, format_of, quantization_config
    from trainer.weights.errors import CheckpointError
    from trainer.weights.load import load_model

    ours = quantization_config(FORMATS["w4a16"], 128, ignore=["lm_head"])
    assert format_of(ours) == (FORMATS["w4a16"], 128)
    theirs = json.loads(json.dumps(ours))
    theirs["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
                                                      "quantization_config": theirs}))
    with pytest.raises(CheckpointError, match=r"config.json: its quantization \(pack-quantized: .*'symmetric': False.* is not one of "
                                              r"our quantized exports \(w4a16, w8a8_int8, w8a8_fp8\); load it with transformers"):
        load_model(tmp_path)
