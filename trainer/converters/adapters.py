"""LoRA / DoRA over a frozen base, 4-bit (QLoRA / QDoRA) or not, as a model converter (the mechanics are in
trainer/adapters/): everything the trainer, the plan, the dry run and the exports need to know about
adapters is answered here."""

import json
from pathlib import Path

import torch
from torch import nn

from models.common.moe import GroupedExperts
from parallel.mesh import ParallelDims
from trainer.adapters import apply_adapters, finish_unit, target_names
from trainer.adapters.export import base_named_weights, export_peft, merged_named_weights
from trainer.adapters.lora import LoRALinear
from trainer.adapters.quantize import bytes_per_weight, check_4bit_setting
from trainer.adapters.tp import ADAPTER_STYLES
from trainer.config import Config, ConfigError
from trainer.config.schema import AdaptersConfig, ExportConfig
from trainer.converters.base import ConverterInfo, FixedEntry, MemoryEstimate, MemoryShape, ModelConverter
from trainer.weights.hf_export import export_hf


class AdapterConverter(ModelConverter):
    name = "adapters"
    # Adapters wrap what float8 or QAT left.
    after = ("float8", "qat")
    # The frozen base comes from model.init_from (or the seeded init) at every start.
    checkpoints_trainable_only = True

    def __init__(self, cfg: AdaptersConfig, exports: ExportConfig, *, init_from: str | None, seed: int):
        self.cfg, self.exports, self.init_from, self.seed = cfg, exports, init_from, seed

    @classmethod
    def from_config(cls, cfg: Config) -> "AdapterConverter | None":
        if cfg.adapters.kind == "none":
            return None
        return cls(cfg.adapters, cfg.export, init_from=cfg.model.init_from, seed=cfg.job.seed)

    def convert(self, meta: nn.Module, dims: ParallelDims) -> None:
        names = target_names(meta, self.cfg.targets)
        experts = [name for name in names if isinstance(meta.get_submodule(name), GroupedExperts)]
        if experts:
            self._check_experts(experts[0])
            names = [name for name in names if name not in experts]
        q = self.cfg.quantize_base
        if q != "none":
            check_4bit_setting("adapters.quantize_base", q, {name: meta.get_submodule(name).weight.shape for name in names},
                               dims=dims, hqq_group_size=self.cfg.hqq_group_size,
                               fix="leave this layer out of adapters.targets, change parallel.dp_shard, or use another quantize_base")
        apply_adapters(meta, self.cfg)

    def _check_experts(self, first: str) -> None:
        """What adapters over stacked experts (trainer/adapters/experts.py) cannot do, refused by name."""
        cfg, where = self.cfg, f"adapters.targets={self.cfg.targets} takes in {first} (stacked experts)"
        if cfg.dropout > 0:
            raise ConfigError(f"{where}, whose updates are folded into the weights, where adapters.dropout={cfg.dropout} "
                              f"cannot apply: set adapters.dropout=0 or leave the experts out of adapters.targets")
        if cfg.quantize_base != "none":
            raise ConfigError(f"{where}, which adapters.quantize_base={cfg.quantize_base} does not quantize: set "
                              f"adapters.quantize_base=none or leave the experts out of adapters.targets")
        if cfg.kind == "dora" and self.exports.peft:
            raise ConfigError(f"{where} with adapters.kind=dora, which peft loads over linear layers only (its "
                              f"target_parameters take LoRA): set export.peft=false (export.hf writes the merged model) "
                              f"or adapters.kind=lora")

    def info(self, model: nn.Module) -> ConverterInfo:
        # What the adapters were trained over. Checkpoints hold only the adapters and the base is rebuilt
        # at every start, so a resume must rebuild the same one (checked before loading).
        q = self.cfg.quantize_base
        base = {"init_from": str(Path(self.init_from).resolve()) if self.init_from else f"seeded init, job.seed={self.seed}",
                "quantize_base": q}
        if q == "hqq":
            base["hqq_group_size"] = self.cfg.hqq_group_size
        entry = FixedEntry(json.dumps(base, sort_keys=True), mismatch=(
            "its adapters were trained over the base {saved}, but this run's base is {ours}: set model.init_from / "
            "adapters.quantize_base back, or start over (a new job.output_dir, or checkpoint.resume_from=none)"))
        return ConverterInfo(checkpoint_entries={"base": entry},
                             tp_styles=ADAPTER_STYLES, describe=f" (over a 4-bit {q} base)" if q != "none" else "")

    def finish_unit(self, pieces, *, shards, seed, frozen_dtype) -> None:
        # The frozen base in the compute dtype, 4-bit if asked, and the adapters initialised, before FSDP
        # shards the unit, since FSDP2 cannot change a parameter's dtype or type afterwards.
        finish_unit(pieces, cfg=self.cfg, shards=shards, seed=seed, frozen_dtype=frozen_dtype)

    def export_tensors(self, model):
        return merged_named_weights(model)

    def export(self, model, export_dir, *, dtype, token_ids) -> dict[Path, str]:
        written = {}
        if self.exports.peft:
            base = export_dir / "base"
            export_peft(model, self.cfg, export_dir / "peft", base_model=str(base.resolve()))
            export_hf(model, base, dtype=dtype, tensors=base_named_weights(model), **token_ids)
            written[export_dir / "peft"] = f"PEFT adapter over {base}"
            q = self.cfg.quantize_base
            written[base] = "Hugging Face checkpoint of the frozen base" + (f" (dequantized from {q})" if q != "none" else "")
        if self.exports.hf:
            export_hf(model, export_dir / "hf", dtype=dtype, tensors=merged_named_weights(model), **token_ids)
            written[export_dir / "hf"] = "Hugging Face checkpoint, adapters merged"
        return written

    def memory(self, shape: MemoryShape, estimate: MemoryEstimate) -> MemoryEstimate:
        # Adapters train in fp32; the frozen base is stored in the compute dtype, its adapted weights
        # 4-bit if quantized (a 4-bit base has no TP, so only FSDP splits it).
        adapted = sum(m.weight.numel() for part in shape.parts for m in part.modules() if isinstance(m, LoRALinear))
        b = shape.compute_bytes
        frozen_dtype = str({2: torch.bfloat16, 4: torch.float32}[b]).removeprefix("torch.")
        weights = (4 * shape.trainable + b * (shape.params - shape.trainable - adapted)) * shape.share
        q = self.cfg.quantize_base
        if q == "none":
            return estimate.replace(weights=weights + b * adapted * shape.share,
                                    weights_label=f"parameters (adapters fp32, frozen base {frozen_dtype})")
        sharded, whole = bytes_per_weight(q, self.cfg.hqq_group_size, b)
        # Blocks are nearly all adapted weights: their 4-bit codes are what FSDP gathers.
        return estimate.replace(
            weights=weights + adapted * (sharded / shape.dp_shard + whole), gathered_bytes=sharded + whole, dequantized=adapted,
            weights_label=f"parameters (adapters fp32, frozen base {frozen_dtype}, adapted weights 4-bit {q})",
        )
