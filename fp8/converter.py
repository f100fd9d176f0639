"""Float8 training as a model converter: the first in the list, so that LoRA / DoRA can wrap the float8
layers it leaves (their frozen product then computes in float8)."""

import importlib.util

import torch
from torch import nn

from fp8.conversion import Conversion, convert_linears, float8_layers, float8_matmul_params
from fp8.hardware import float8_peak_ratio, missing_float8_hardware
from fp8.tp import FLOAT8_STYLES, gather_float8_as_bytes
from trainer.config import Config, ConfigError
from trainer.config.schema import Float8Config
from trainer.converters import ModelConverter


class Float8Converter(ModelConverter):
    name = "float8"

    def __init__(self, cfg: Float8Config, *, compile: bool):
        self.cfg, self.compile = cfg, compile
        self.conversion = Conversion()
        # torchao's float8 TP styles assume one scale per tensor; the rowwise recipes take the plain ones.
        self.linear_styles = FLOAT8_STYLES if cfg.recipe == "tensorwise" and not __import__("os").environ.get("NOSTY") else None

    @classmethod
    def from_config(cls, cfg: Config) -> "Float8Converter | None":
        return cls(cfg.fp8, compile=cfg.compile.enabled) if cfg.fp8.enabled else None

    def check(self, meta: nn.Module, dims) -> None:
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("fp8.enabled=true needs the torchao package: pip install torchao")
        missing = missing_float8_hardware()
        if missing is not None and not self.cfg.emulate:
            raise ConfigError(
                f"fp8.enabled=true needs float8 matmuls, on an NVIDIA GPU of compute capability 8.9 or newer (L4, "
                f"L40S, H100, H200, B200), and this machine has {missing}; set fp8.emulate=true to train with float8 "
                f"numerics computed in high precision (for tests: slower, not faster), or fp8.enabled=false"
            )
        if dims.tp > 1 and self.linear_styles is not None:
            gather_float8_as_bytes()

    def convert(self, model: nn.Module) -> None:
        self.conversion = convert_linears(model, self.cfg)

    def after_optimizer_step(self, parts: list[nn.Module]) -> None:
        # One all-reduce for every layer's weight scale, once per step, instead of one per layer in
        # each FSDP all-gather; skipped steps leave the weights, so their scales stay right.
        if self.cfg.fsdp_float8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            for part in parts:
                precompute_float8_dynamic_scale_for_fsdp(part)

    def report(self) -> list[str]:
        lines = self.conversion.lines(self.cfg)
        if torch.cuda.is_available() and not self.cfg.emulate and not self.compile:
            lines.append("float8 without compile.enabled=true is slow (eager casts are separate kernels, often slower "
                         "than bf16): set compile.enabled=true")
        return lines

    def fast_flops(self, model: nn.Module) -> tuple[str, float, float, str]:
        # Forward, input-gradient and weight-gradient matmuls: 2 FLOPs per weight each, all three in
        # float8 except the weight gradient of rowwise_with_gw_hp.
        matmuls = 2 if self.cfg.recipe == "rowwise_with_gw_hp" else 3
        ratio, source = float8_peak_ratio(self.cfg.emulate)
        return "float8", 2 * matmuls * float8_matmul_params(model), ratio, source

    def gathered_bytes(self, model: nn.Module, compute_bytes: int) -> float | None:
        """FSDP's float8 all-gather moves 1 byte per converted weight."""
        if not self.cfg.fsdp_float8_all_gather:
            return None
        blocks = [p.numel() for n, p in model.named_parameters() if n.startswith("layers.")]
        converted = float8_matmul_params(model)
        return (converted + compute_bytes * (sum(blocks) - converted)) / max(1, sum(blocks))

    def memory(self, model: nn.Module, *, micro_tokens: int, tp: int) -> dict[str, float]:
        # The largest layer's transient float8 copies: its input and output gradient, its weight twice
        # (as is and transposed for the input gradient), 1 byte each, split by TP.
        sizes = [(m.in_features, m.out_features) for m in float8_layers(model)]
        largest = max((micro_tokens * (i + o) + 2 * i * o for i, o in sizes), default=0)
        return {"float8 casts (largest layer, transient)": largest / tp}
