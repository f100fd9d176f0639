"""optimizer.name's choices against the libraries' own optimizers, bfloat16 stochastic rounding, and the
checkpoint form of block-quantized moments (exact on the same layout)."""

import pytest
import torch
from torch import nn

from trainer.bf16_adamw import stochastic_round_
from trainer.config import load_config
from trainer.config.schema import OptimizerConfig
from trainer.dry_run import estimate_memory
from trainer.optimizer import OPTIMIZERS
from trainer.plan import make_plan
from trainer.precision import Precision

CFG = OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)  # 64 x 128 weights: 8,192 values, quantized (torchao quantizes from 4,096); 1-D ones are not
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 64))


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": CFG.weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def _steps(build, steps: int = 6, make=_model) -> list[torch.Tensor]:
    model = make()
    opt, gen = build(model), torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ours(name: str, compile_step: str = "auto"):
    cfg = OptimizerConfig(**{**vars(CFG), "name": name, "compile_step": compile_step})
    return lambda model: OPTIMIZERS[name](list(model.parameters()), cfg, torch.device("cpu"))


def _largest_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_bf16_moments_update_as_torch_adamw_within_bf16_rounding():
    theirs = _steps(lambda m: torch.optim.AdamW(_groups(m), lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps))
    # Six steps of at most lr each move a value by ~6e-3; bf16 moments (3 significant digits) move it
    # differently by under 1e-4 (measured 2.7e-5).
    assert _largest_difference(_steps(_ours("adamw_bf16")), theirs) < 1e-4


@pytest.mark.parametrize("name,cls", [("adamw_8bit", "AdamW8bit"), ("adamw_4bit", "AdamW4bit")])
def test_quantized_moments_update_as_torchaos_own_optimizer(name, cls):
    import torchao.optim

    def theirs(model):
        return getattr(torchao.optim, cls)(_groups(model), lr=CFG.lr, betas=(CFG.beta1, CFG.beta2), eps=CFG.eps)

    with torch.compiler.set_stance("force_eager"):
        reference = _steps(theirs)
    ours = _steps(_ours(name))  # eager on CPU, with the config's groups and hyperparameters
    assert _largest_difference(ours, reference) == 0.0
    if name == "adamw_8bit":  # the compiled step, as on a GPU: one weight, one shape to compile (~3 s here)
        def one_weight():
            torch.manual_seed(0)
            return nn.Linear(64, 128, bias=False)

        with torch.compiler.set_stance("force_eager"):
            eager = _steps(theirs, make=one_weight)
        compiled = _steps(_ours(name, compile_step="always"), make=one_weight)
        assert _largest_difference(compiled, eager) < 1e-6  # fused arithmetic rounds a little differently


def test_stochastic_rounding_is_unbiased_and_a_function_of_value_and_step():
    value = torch.full((20_000,), 1.0 + 2**-10)  # a quarter of the way from bf16's 1.0 to 1.0078125
    out = torch.empty_like(value, dtype=torch.bfloat16)
    spread = value + torch.arange(20_000) * 2**-30  # distinct float32 values, the same bfloat16 neighbours
    stochastic_round_(out, spread, step=3)
    assert set(out.float().unique().tolist()) == {1.0, 1.0078125}
    assert abs(out.float().mean().item() - value[0].item()) < 2e-4  # unbiased: E[rounded] = value
    # Where an element sits (which rank, which shard) does not matter: the same value rounds alike.
    again = torch.empty_like(out)
    stochastic_round_(again, spread.flip(0), step=3)
    assert torch.equal(again.flip(0), out)
    other_step = torch.empty_like(out)
    stochastic_round_(other_step, spread, step=4)
    assert not torch.equal(other_step, out)
    negative = torch.empty_like(out)
    stochastic_round_(negative, -spread, step=3)
    assert torch.equal(negative, -out)  # on the magnitude
    special = torch.empty(3, dtype=torch.bfloat16)
    stochastic_round_(special, torch.tensor([float("inf"), float("-inf"), 0.0]), step=1)
    assert special.tolist() == [float("inf"), float("-inf"), 0.0]


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit"])
def test_quantized_moments_come_back_exactly_with_their_scales(name):
    from trainer.checkpoint.quantized_moments import is_quantized, restore_, scales_key, to_checkpoint

    model = _model()
    opt = _ours(name)(model)
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    opt.step()
    weight = model[0].weight
    moment = opt.state[weight]["exp_avg"]
    assert is_quantized(moment) and not is_quantized(opt.state[model[1].weight]["exp_avg"])
    saved = to_checkpoint("m", moment)
    assert set(saved) == {"m", scales_key("m", moment)} and saved["m"].dtype == torch.float32

    def fresh():
        other = _ours(name)(_model())
        for p in other.param_groups[0]["params"] + other.param_groups[1]["params"]:
            p.grad = torch.zeros_like(p)
        other.step()
        return other.state[other.param_groups[0]["params"][0]]["exp_avg"]

    exact = fresh()
    restore_(exact, saved["m"], saved[scales_key("m", moment)])
    assert torch.equal(exact.codes, moment.codes) and torch.equal(exact.scale, moment.scale)
    # Without the scales (a resume on another layout) the values are quantized afresh: blocks whose
    # largest magnitude is negative get another scale (the code books' most negative values are -0.993 in
    # 8 bits, -0.8875 in 4), and their values move by up to a code's width.
    afresh = fresh()
    restore_(afresh, saved["m"], None)
    assert not torch.equal(afresh.scale, moment.scale)
    assert torch.allclose(afresh.dequantize(), moment.dequantize(), rtol=0.2, atol=1e-3 * moment.scale.max().item())


def test_dry_run_counts_each_choices_moments():
    def state(name):
        cfg = load_config("configs/debug.yaml", [f"optimizer.name={name}"])
        memory = estimate_memory(make_plan(cfg, 1), Precision(torch.float32, torch.float32))
        return next(v for k, v in memory.items() if k.startswith("optimizer state"))

    fp32, bf16, int8, int4 = (state(n) for n in ("adamw", "adamw_bf16", "adamw_8bit", "adamw_4bit"))
    assert bf16 == fp32 / 2
    # The debug model's norm gains are too small to quantize (float32 moments); the rest is ~2 and ~1 bytes.
    assert fp32 / 4 < int8 < fp32 / 3.8 and fp32 / 8 < int4 < fp32 / 7
