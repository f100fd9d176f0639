"""Which linear layers compute in float8, and the swap itself (torchao's convert_to_float8_training).

Only the transformer blocks' linear layers convert. The output head stays in high precision: its
logits feed the softmax directly, and float8 there costs accuracy for a single matmul (torchtitan and
torchao's recipes keep it too). A layer whose sizes are not multiples of 16 cannot use the float8 matmul
kernels at all. Every layer that stays is listed with its reason, for the start-up lines.
"""

import dataclasses

import torch
from torch import nn

from fp8.config import Float8Config
from models.common.linear import product_of, set_product

# The float8 formats of each recipe, for the start-up line.
_RECIPE_WORDS = {
    "tensorwise": "one scale per tensor",
    "rowwise": "one scale per row",
    "rowwise_with_gw_hp": "one scale per row, weight gradients in high precision",
}


def torchao_config(cfg: Float8Config):
    """torchao's Float8LinearConfig for the recipe, with emulation and float8 all-gather as configured."""
    from torchao.float8 import Float8LinearConfig

    recipe = Float8LinearConfig.from_recipe_name(cfg.recipe)
    return dataclasses.replace(recipe, emulate=cfg.emulate, enable_fsdp_float8_all_gather=cfg.fsdp_float8_all_gather)


def keep_reason(name: str, module: nn.Module, cfg: Float8Config) -> str | None:
    """Why the linear layer `name` stays in high precision, or None when it converts."""
    if not name.startswith("layers."):
        return "not in a transformer block (the output head stays in high precision)"
    matched = next((f for f in cfg.filter_fqns if f in name), None)
    if matched is not None:
        return f"fp8.filter_fqns has {matched!r}"
    if name.endswith(".router"):
        # Its scores choose each token's experts: a float8 rounding flips close choices (torchtitan keeps it too).
        return "a mixture-of-experts router (its scores choose the experts)"
    out_features, in_features = module.weight.shape
    if out_features % 16 or in_features % 16:
        return f"its sizes {in_features} -> {out_features} are not multiples of 16 (float8 matmuls need that)"
    if cfg.auto_filter_small_kn:
        from torchao.float8 import _auto_filter_for_recipe

        if not _auto_filter_for_recipe(cfg.recipe, filter_fqns=[])(module, name):
            return f"too small to gain from float8 (torchao's {cfg.recipe} size thresholds, fp8.auto_filter_small_kn)"
    return None


def conversion_lines(model: nn.Module, cfg: Float8Config) -> list[str]:
    """For the start of a run, read from a model convert_linears just converted: how many linear layers
    convert, and for the others, why they stay."""
    converted = float8_layers(model)
    kept = {name: keep_reason(name, m, cfg) for name, m in model.named_modules() if type(m) is nn.Linear}
    total = len(converted) + len(kept)
    how = "emulated in high precision: float8 numerics, not its speed" if cfg.emulate else "float8 matmuls"
    gather = ", FSDP gathers them in float8" if cfg.fsdp_float8_all_gather else ""
    lines = [f"float8 ({cfg.recipe}: {_RECIPE_WORDS[cfg.recipe]}; {how}): {len(converted)} of {total} "
             f"linear layers convert{gather}"]
    by_reason: dict[str, list[str]] = {}
    for name, reason in kept.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"  kept in high precision: {shown}: {reason}")
    return lines


class Float8Product:
    """x @ W.T through torchao's float8 matmul, with the settings of the layer it came from. An adapter
    layer that replaces a float8 layer keeps computing its frozen product this way (LoRA over a float8
    base: the adapter's own small matmuls stay in high precision)."""

    def __init__(self, module: nn.Module):
        self.config, self.linear_mm_config = module.config, module.linear_mm_config

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        return matmul_with_hp_or_float8_args.apply(x, weight.t(), self.linear_mm_config, self.config)

    def __repr__(self) -> str:
        return "float8"


def convert_linears(model: nn.Module, cfg: Float8Config) -> None:
    """Swaps the chosen nn.Linear layers of `model` (on meta) for torchao's Float8Linear, in place and
    under the same names."""
    from torchao.float8 import convert_to_float8_training

    chosen = {name for name, m in model.named_modules() if type(m) is nn.Linear and keep_reason(name, m, cfg) is None}
    convert_to_float8_training(model, module_filter_fn=lambda module, name: name in chosen, config=torchao_config(cfg))
    for name in chosen:
        layer = model.get_submodule(name)
        set_product(layer, Float8Product(layer))


def float8_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose weight meets its input in float8: torchao's, or adapter layers over one."""
    from torchao.float8.float8_linear import Float8Linear

    return [m for m in model.modules() if isinstance(m, Float8Linear) or isinstance(product_of(m), Float8Product)]


def float8_matmul_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in float8_layers(model))
