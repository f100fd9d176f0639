"""Float8 conversion (fp8/), on meta and on CPU with torchao's emulation: which layers convert and why
the others stay, the TP styles the plan picks, LoRA over a float8 base, the MFU split and the dry run."""

import pytest
import torch
from torch import nn

from types import SimpleNamespace

from fp8.conversion import conversion_lines, keep_reason
from trainer.config import load_config
from trainer.dry_run import estimate_memory
from trainer.metrics import FastFlops
from trainer.plan import make_plan
from trainer.precision import Precision

pytest.importorskip("torchao")
from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

FP8 = ["fp8.enabled=true", "fp8.emulate=true"]
BLOCK_LINEARS = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3"]


def _converted(config: str, *overrides: str, world: int = 1):
    cfg = load_config(config, [*FP8, *overrides])
    plan = make_plan(cfg, world)
    model = plan.meta  # converted once, by the plan
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # What the conversion did, read back from the model: the float8 layers, and why each other one stayed.
    done = SimpleNamespace(converted=[n for n, k in kinds.items() if k is Float8Linear],
                           kept={n: keep_reason(n, model.get_submodule(n), cfg.fp8) for n, k in kinds.items() if k is nn.Linear})
    return plan, model, kinds, done


def test_debug_model_converts_every_block_linear_and_keeps_the_head():
    plan, _, kinds, done = _converted("configs/debug.yaml")
    blocks = [f"layers.{i}.{n}" for i in range(plan.model_args.n_layers) for n in BLOCK_LINEARS]
    assert sorted(done.converted) == sorted(blocks)
    assert all(kinds[name] is Float8Linear for name in blocks)
    assert kinds["output"] is nn.Linear and "not in a transformer block" in done.kept["output"]


def test_sizes_not_multiples_of_16_and_filtered_names_stay():
    # A hidden size of 344 (= 16 x 21.5) leaves the MLP; the filter takes every attention.wo.
    _, _, kinds, done = _converted("configs/debug.yaml", "model.ffn_hidden_dim=344", "fp8.filter_fqns=[attention.wo]")
    for i in range(4):
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            assert kinds[f"layers.{i}.{name}"] is nn.Linear
            assert "not multiples of 16" in done.kept[f"layers.{i}.{name}"]
        assert kinds[f"layers.{i}.attention.wo"] is nn.Linear
        assert done.kept[f"layers.{i}.attention.wo"] == "fp8.filter_fqns has 'attention.wo'"
        assert kinds[f"layers.{i}.attention.wq"] is Float8Linear
    _, model, _, _ = _converted("configs/debug.yaml", "model.ffn_hidden_dim=344", "fp8.filter_fqns=[attention.wo]")
    lines = conversion_lines(model, load_config("configs/debug.yaml", [*FP8, "fp8.filter_fqns=[attention.wo]"]).fp8)
    assert lines[0].startswith("float8 (tensorwise") and "12 of 29 linear layers convert" in lines[0]
    assert any("feed_forward.w1" in line and "not multiples of 16" in line for line in lines[1:])


def test_llama3_2_1b_on_meta_and_torchaos_size_filter():
    _, model, kinds, done = _converted("configs/llama3_2_1b.yaml", world=8)
    assert len(done.converted) == 16 * 7 and all(name.startswith("layers.") for name in done.converted)
    # torchao's tensorwise thresholds keep K <= 4096 and N <= 1024: the 2048 -> 512 key and value projections.
    _, _, kinds, done = _converted("configs/llama3_2_1b.yaml", "fp8.auto_filter_small_kn=true", world=8)
    for i in range(16):
        assert kinds[f"layers.{i}.attention.wk"] is nn.Linear and kinds[f"layers.{i}.attention.wv"] is nn.Linear
        assert "too small to gain" in done.kept[f"layers.{i}.attention.wk"]
        assert kinds[f"layers.{i}.attention.wq"] is Float8Linear and kinds[f"layers.{i}.feed_forward.w2"] is Float8Linear
    assert len(done.converted) == 16 * 5


def test_tensorwise_tp_plan_takes_torchaos_float8_styles_and_rowwise_the_plain_ones():
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel


    for recipe, colwise, rowwise, prepare in (
        ("tensorwise", Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput),
        ("rowwise", ColwiseParallel, RowwiseParallel, PrepareModuleInput),
    ):
        plan, model, _, _ = _converted("configs/debug.yaml", f"fp8.recipe={recipe}", "parallel.tp=2", world=2)
        tp = plan.family.tp_plan(model, loss_parallel=True, styles=plan.info.tp_styles)
        block = tp.block(model.layers["0"])
        assert type(block["attention.wq"]) is colwise and type(block["feed_forward.w2"]) is rowwise
        assert type(block["attention"]) is prepare and type(block["feed_forward"]) is prepare
        assert type(tp.top["output"]) is ColwiseParallel  # the head is not float8
    # With adapters over the float8 layers, the adapters' styles take them and the input stays high precision.
    from trainer.adapters.tp import LoRAColwise

    plan, model, _, _ = _converted("configs/debug.yaml", "adapters.kind=lora", "adapters.targets=[q]", "parallel.tp=2", world=2)
    block = plan.family.tp_plan(model, loss_parallel=True, styles=plan.info.tp_styles).block(
        model.layers["0"])
    assert type(block["attention.wq"]) is LoRAColwise and type(block["attention.wk"]) is Float8ColwiseParallel
    assert type(block["attention"]) is PrepareModuleInput and type(block["feed_forward"]) is PrepareFloat8ModuleInput


def test_lora_over_a_float8_base_computes_its_frozen_product_in_float8():
    """Against torchao's own Float8Linear: with B = 0 the adapted layer is exactly the float8 layer, and
    its output differs from a high-precision linear by float8's rounding."""
    from fp8.conversion import Float8Product
    from models.common.linear import set_product
    from trainer.adapters.lora import LoRALinear

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 32, bias=False))
    x = torch.randn(4, 64)
    reference = plain[0](x)
    float8 = convert_to_float8_training(plain, config=Float8LinearConfig(emulate=True))[0]
    set_product(float8, Float8Product(float8))
    lora = LoRALinear(float8, rank=4, alpha=8, dropout=0.0, rslora=False, dora=False)
    nn.init.normal_(lora.lora_a)
    nn.init.zeros_(lora.lora_b)
    out = lora(x)
    assert torch.equal(out, float8(x))
    assert 1e-4 < (out - reference).abs().max() < 0.1 * reference.abs().max()
    out.sum().backward()
    assert lora.lora_b.grad is not None and lora.weight.grad is None
    assert "float8" in repr(lora)


def test_mixed_peak_mfu():
    fast = FastFlops("float8", share=0.75, peak_ratio=2.0)
    assert fast.mixed(40.0) == pytest.approx(40.0 * (0.25 + 0.375))
    assert FastFlops("float8", 0.75, 1.0).mixed(40.0) == 40.0  # emulated: nothing faster
    plan, model, _, done = _converted("configs/debug.yaml")
    fast = plan.info.fast_matmuls
    fmt, flops, ratio = fast.format, fast.flops_per_token, fast.peak_ratio
    converted = sum(model.get_submodule(n).weight.numel() for n in done.converted)
    assert (fmt, flops, ratio) == ("float8", 6 * converted, 1.0)
    assert flops < plan.family.flops_per_token(plan.model_args, 256)
    plan, model, _, _ = _converted("configs/debug.yaml", "fp8.recipe=rowwise_with_gw_hp")
    assert plan.info.fast_matmuls.flops_per_token == 4 * converted  # weight gradients in high precision


def test_dry_run_counts_float8_casts_and_the_float8_all_gather():
    def estimate(*overrides):
        cfg = load_config("configs/llama3_2_1b.yaml", [*FP8, *overrides])
        return estimate_memory(make_plan(cfg, 8), Precision(torch.bfloat16, torch.float32))

    plain, gathered = estimate(), estimate("fp8.fsdp_float8_all_gather=true")
    casts = "float8 casts (largest layer, transient)"
    assert plain[casts] > 0 and gathered[casts] == plain[casts]
    # Nearly all of a block is float8 weights: 1 byte instead of bf16's 2.
    ratio = gathered["gathered parameters in flight"] / plain["gathered parameters in flight"]
    assert 0.5 <= ratio < 0.51
