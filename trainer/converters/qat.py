"""Quantization-aware training as a model converter (the numbers are in trainer/qat/schemes.py, the layers in
trainer/qat/layers.py). It comes before the adapters, which then wrap its layers (QAT + LoRA / DoRA: the
frozen base computes fake-quantized, the adapters in high precision)."""

from torch import nn

from parallel.mesh import ParallelDims
from trainer.config import Config, ConfigError
from trainer.config.schema import QATConfig
from trainer.converters.base import ConverterInfo, MemoryEstimate, MemoryShape, ModelConverter
from trainer.qat.layers import QATEmbedding, QATLinear, chosen_layers, qat_layers, set_fake_quant
from trainer.qat.schemes import SCHEMES


class QATConverter(ModelConverter):
    name = "qat"
    reapplied_on_load = True  # the run's model is the one that rounds

    def __init__(self, cfg: QATConfig):
        self.cfg, self.scheme = cfg, SCHEMES[cfg.scheme]

    @classmethod
    def from_config(cls, cfg: Config) -> "QATConverter | None":
        # The settings' own checks, and QAT's with other sections, are the config's (trainer/config/checks.py).
        return cls(cfg.qat) if cfg.qat.scheme != "none" else None

    def convert(self, meta: nn.Module, dims: ParallelDims) -> None:
        chosen = [name for name, reason in chosen_layers(meta, self.cfg).items() if reason is None]
        if self.scheme.per_group:
            for name in chosen:
                features = meta.get_submodule(name).weight.shape[1]
                if features % self.cfg.group_size:
                    raise ConfigError(
                        f"qat.group_size={self.cfg.group_size} does not divide {name}'s {features} input features (each "
                        f"group of weights shares one scale): choose a group size that divides it (e.g. 32), or leave "
                        f"the layer out (qat.head / qat.embeddings)")
        for name in chosen:
            layer = meta.get_submodule(name)
            swap = QATEmbedding.swap if isinstance(layer, nn.Embedding) else QATLinear.swap
            swap(layer, self.scheme, self.cfg.group_size)

    def info(self, model: nn.Module) -> ConverterInfo:
        reasons = chosen_layers(model, self.cfg)
        rounded = len(qat_layers(model))
        group = f", groups of {self.cfg.group_size}" if self.scheme.per_group else ""
        when = f"from step {self.cfg.start_step + 1}" if self.cfg.start_step else "from the first step"
        lines = [f"qat ({self.scheme.name}: {self.scheme.words}{group}): {rounded} layers fake-quantized {when}"]
        by_reason: dict[str, list[str]] = {}
        for name, reason in reasons.items():
            if reason is not None:
                by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"  kept in high precision: {shown}: {reason}")
        return ConverterInfo(describe=f" (QAT {self.scheme.name})", start_lines=tuple(lines))

    def before_step(self, parts: list[nn.Module], step: int) -> None:
        for part in parts:
            set_fake_quant(part, step > self.cfg.start_step)

    def memory(self, shape: MemoryShape, estimate: MemoryEstimate) -> MemoryEstimate:
        # The largest layer's rounded copies, transient and in float32: its weight (computed, then the
        # copy in the compute dtype) and its input, split by TP.
        sizes = [layer.weight.numel() for layer in qat_layers(shape.model)]
        inputs = [layer.weight.shape[1] for layer in qat_layers(shape.model) if isinstance(layer, nn.Linear)]
        largest = (4 + shape.compute_bytes) * max(sizes, default=0) + 4 * shape.micro_tokens * max(inputs, default=0)
        return estimate.replace(extra={**estimate.extra, "QAT rounded copies (largest layer, transient)": largest / shape.tp})
