"""Quantization-aware training as a model converter (the numbers are in trainer/qat/schemes.py, the layers in
trainer/qat/layers.py). It comes before the adapters, which then wrap its layers (QAT + LoRA / DoRA: the
frozen base computes fake-quantized, the adapters in high precision)."""

import torch
from torch import nn

from models.common.moe import GroupedExperts
from parallel.mesh import ParallelDims
from trainer.config import Config, ConfigError
from trainer.config.schema import QATConfig
from trainer.converters.base import ConverterInfo, MemoryEstimate, MemoryShape, ModelConverter
from trainer.qat.layers import QATEmbedding, QATLinear, chosen_layers, qat_layers, round_experts, set_fake_quant
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
                for where, weight in _weights(name, meta.get_submodule(name)):
                    if weight.shape[-1] % self.cfg.group_size:
                        optional = not name.startswith("layers.")  # the head and the embeddings may stay out
                        raise ConfigError(
                            f"qat.group_size={self.cfg.group_size} does not divide {where}'s {weight.shape[-1]} input "
                            f"features (each group of weights shares one scale): choose a group size that divides it "
                            f"(e.g. 32)" + (", or leave the layer out (qat.head / qat.embeddings)" if optional else ""))
        for name in chosen:
            layer = meta.get_submodule(name)
            if isinstance(layer, GroupedExperts):
                round_experts(layer, self.scheme, self.cfg.group_size)
            else:
                swap = QATEmbedding.swap if isinstance(layer, nn.Embedding) else QATLinear.swap
                swap(layer, self.scheme, self.cfg.group_size)

    def info(self, model: nn.Module) -> ConverterInfo:
        reasons = chosen_layers(model, self.cfg)
        rounded = len(qat_layers(model))
        group = f", groups of {self.cfg.group_size}" if self.scheme.per_group else ""
        when = f"from step {self.cfg.start_step + 1}" if self.cfg.start_step else "from the first step"
        stacks = sum(isinstance(m, GroupedExperts) for m in qat_layers(model))
        of_them = f" ({stacks} of them stacked experts, each expert rounded as a linear layer)" if stacks else ""
        lines = [f"qat ({self.scheme.name}: {self.scheme.words}{group}): {rounded} layers fake-quantized{of_them} {when}"]
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
        # copy in the compute dtype) and its input, split by TP. Stacked experts round a whole stack at
        # once (counted whole: an upper bound under expert parallelism) over every token's top-k rows.
        largest = 0
        for layer in qat_layers(shape.model):
            rows = shape.micro_tokens * (shape.model.args.top_k if isinstance(layer, GroupedExperts) else 1)
            for _, weight in _weights("", layer):
                features = weight.shape[-1] if not isinstance(layer, nn.Embedding) else 0
                largest = max(largest, (4 + shape.compute_bytes) * weight.numel() + 4 * rows * features)
        return estimate.replace(extra={**estimate.extra, "QAT rounded copies (largest layer, transient)": largest / shape.tp})


def _weights(name: str, layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of each weight a chosen layer rounds: stacked experts have three."""
    if isinstance(layer, GroupedExperts):
        return [(f"{name}.{w}", getattr(layer, w)) for w in ("w1", "w2", "w3")]
    return [(name, layer.weight)]
