"""Float8 training as a model converter (the mechanics are in fp8/). It comes before the adapters, so that
LoRA / DoRA can wrap the float8 layers it leaves (their frozen product then computes in float8)."""

import importlib.util

import torch
from torch import nn

from fp8.config import Float8Config
from fp8.conversion import conversion_lines, convert_linears, float8_layers, float8_matmul_params
from fp8.hardware import float8_peak_ratio, missing_float8_hardware
from fp8.tp import FLOAT8_STYLES
from parallel.library_patches import float8_all_gather_over_gloo
from parallel.mesh import ParallelDims
from trainer.config import Config, ConfigError
from trainer.converters.base import ConverterInfo, FastMatmuls, MemoryEstimate, MemoryShape, ModelConverter


class Float8Converter(ModelConverter):
    name = "float8"

    def __init__(self, cfg: Float8Config, *, compile: bool):
        self.cfg, self.compile = cfg, compile

    @classmethod
    def from_config(cls, cfg: Config) -> "Float8Converter | None":
        return cls(cfg.fp8, compile=cfg.compile.enabled) if cfg.fp8.enabled else None

    def convert(self, meta: nn.Module, dims: ParallelDims) -> None:
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError("fp8.enabled=true needs the torchao package: pip install torchao")
        missing = missing_float8_hardware()
        if missing is not None and not self.cfg.emulate:
            raise ConfigError(
                f"fp8.enabled=true needs float8 matmuls, on an NVIDIA GPU of compute capability 8.9 or newer (L4, "
                f"L40S, H100, H200, B200), and this machine has {missing}; set fp8.emulate=true to train with float8 "
                f"numerics computed in high precision (for tests: slower, not faster), or fp8.enabled=false"
            )
        convert_linears(meta, self.cfg)

    def info(self, model: nn.Module) -> ConverterInfo:
        lines = conversion_lines(model, self.cfg)
        if torch.cuda.is_available() and not self.cfg.emulate and not self.compile:
            lines.append("float8 without compile.enabled=true is slow (eager casts are separate kernels, often slower "
                         "than bf16): set compile.enabled=true")
        # Forward, input-gradient and weight-gradient matmuls: 2 FLOPs per weight each, all three in
        # float8 except the weight gradient of rowwise_with_gw_hp.
        matmuls = 2 if self.cfg.recipe == "rowwise_with_gw_hp" else 3
        ratio, source = float8_peak_ratio(self.cfg.emulate)
        tensorwise = self.cfg.recipe == "tensorwise"
        return ConverterInfo(
            # torchao's float8 TP styles assume one scale per tensor; the rowwise recipes take the plain ones.
            tp_styles=FLOAT8_STYLES if tensorwise else None, start_lines=tuple(lines),
            fast_matmuls=FastMatmuls("float8", 2 * matmuls * float8_matmul_params(model), ratio, source),
            # Over gloo (CPU) the float8 TP all-gather needs the byte-wise path; on CUDA it leaves NCCL alone.
            run_patches=(float8_all_gather_over_gloo,) if tensorwise else (),
        )

    def after_optimizer_step(self, parts: list[nn.Module]) -> None:
        # One all-reduce for every layer's weight scale, once per step, instead of one per layer in
        # each FSDP all-gather; skipped steps leave the weights, so their scales stay right.
        if self.cfg.fsdp_float8_all_gather:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            for part in parts:
                precompute_float8_dynamic_scale_for_fsdp(part)

    def memory(self, shape: MemoryShape, estimate: MemoryEstimate) -> MemoryEstimate:
        # The largest layer's transient float8 copies: its input and output gradient, its weight twice
        # (as is and transposed for the input gradient), 1 byte each, split by TP.
        sizes = [(m.in_features, m.out_features) for m in float8_layers(shape.model)]
        largest = max((shape.micro_tokens * (i + o) + 2 * i * o for i, o in sizes), default=0)
        extra = {**estimate.extra, "float8 casts (largest layer, transient)": largest / shape.tp}
        if not self.cfg.fsdp_float8_all_gather:
            return estimate.replace(extra=extra)
        # FSDP's float8 all-gather moves 1 byte per converted weight.
        blocks = sum(p.numel() for n, p in shape.model.named_parameters() if n.startswith("layers."))
        converted = float8_matmul_params(shape.model)
        gathered = (converted + estimate.gathered_bytes * (blocks - converted)) / max(1, blocks)
        return estimate.replace(extra=extra, gathered_bytes=gathered)
