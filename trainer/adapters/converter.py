"""LoRA / DoRA over a frozen base, 4-bit (QLoRA / QDoRA) or not, as a model converter: everything the
trainer, the plan, the dry run and the exports need to know about adapters is answered here."""

import json
from pathlib import Path

import torch
from torch import nn

from trainer.adapters import apply_adapters, finish_unit, target_names
from trainer.adapters.export import base_named_weights, export_peft, merged_named_weights
from trainer.adapters.load import load_adapters
from trainer.adapters.lora import LoRALinear
from trainer.adapters.quantize import bytes_per_weight, check_4bit_setting
from trainer.adapters.tp import ADAPTER_STYLES
from trainer.config import Config
from trainer.converters import ModelConverter
from trainer.weights.hf_export import export_hf


class AdapterConverter(ModelConverter):
    name = "adapters"
    # The frozen base comes from model.init_from (or the seeded init) at every start.
    checkpoints_trainable_only = True
    linear_styles = ADAPTER_STYLES

    def __init__(self, cfg: Config):
        self.run_cfg = cfg
        self.cfg, self.init_from, self.seed, self.exports = cfg.adapters, cfg.model.init_from, cfg.job.seed, cfg.export

    @classmethod
    def from_config(cls, cfg: Config) -> "AdapterConverter | None":
        return cls(cfg) if cfg.adapters.kind != "none" else None

    def check(self, meta: nn.Module, dims) -> None:
        names = target_names(meta, self.cfg.targets)
        q = self.cfg.quantize_base
        if q == "none":
            return
        check_4bit_setting("adapters.quantize_base", q, {name: meta.get_submodule(name).weight.shape for name in names},
                           dims=dims, hqq_group_size=self.cfg.hqq_group_size,
                           fix="leave this layer out of adapters.targets, change parallel.dp_shard, or use another quantize_base")

    def convert(self, model: nn.Module) -> None:
        apply_adapters(model, self.cfg)

    def finish_unit(self, pieces, *, shards, seed, frozen_dtype) -> None:
        # The frozen base in the compute dtype, 4-bit if asked, and the adapters initialised, before FSDP
        # shards the unit, since FSDP2 cannot change a parameter's dtype or type afterwards.
        finish_unit(pieces, cfg=self.cfg, shards=shards, seed=seed, frozen_dtype=frozen_dtype)

    def checkpoint_entries(self) -> dict[str, dict]:
        """What the adapters were trained over. Checkpoints hold only the adapters and the base is rebuilt
        at every start, so a resume must rebuild the same one (checked before loading)."""
        q = self.cfg.quantize_base
        base = {"init_from": str(Path(self.init_from).resolve()) if self.init_from else f"seeded init, job.seed={self.seed}",
                "quantize_base": q}
        if q == "hqq":
            base["hqq_group_size"] = self.cfg.hqq_group_size
        return {"base": {"json": json.dumps(base, sort_keys=True)}}

    def describe(self) -> str:
        q = self.cfg.quantize_base
        return f" (over a 4-bit {q} base)" if q != "none" else ""

    def load_run(self, step_path: Path) -> nn.Module:
        # This run's own config (in memory): its base, rebuilt as at the start, and the checkpoint's adapters.
        return load_adapters(self.run_cfg, step_path)

    def export(self, model, export_dir, *, dtype, token_ids) -> dict[Path, str]:
        written = {}
        if self.exports.peft:
            base = export_dir / "base"
            export_peft(model, self.cfg, export_dir / "peft", base_model=str(base.resolve()))
            export_hf(model, base, dtype=dtype, tensors=base_named_weights(model), **token_ids)
            written[export_dir / "peft"] = f"PEFT adapter over {base}"
            written[base] = "Hugging Face checkpoint of the frozen base (dequantized)"
        if self.exports.hf:
            export_hf(model, export_dir / "hf", dtype=dtype, tensors=merged_named_weights(model), **token_ids)
            written[export_dir / "hf"] = "Hugging Face checkpoint, adapters merged"
        return written

    def count_adapted(self, parts: list[nn.Module]) -> int:
        return sum(m.weight.numel() for part in parts for m in part.modules() if isinstance(m, LoRALinear))

    def weight_bytes(self, *, params, trainable, adapted, share, compute_bytes, dp_shard):
        # Adapters train in fp32; the frozen base is stored in the compute dtype, its adapted weights
        # 4-bit if quantized (a 4-bit base has no TP, so only FSDP splits it).
        frozen_dtype = str({2: torch.bfloat16, 4: torch.float32}[compute_bytes]).removeprefix("torch.")
        weights = (4 * trainable + compute_bytes * (params - trainable - adapted)) * share
        q = self.cfg.quantize_base
        if q == "none":
            return (weights + compute_bytes * adapted * share, f"parameters (adapters fp32, frozen base {frozen_dtype})",
                    compute_bytes)
        sharded, whole = bytes_per_weight(q, self.cfg.hqq_group_size, compute_bytes)
        # Blocks are nearly all adapted weights: their 4-bit codes are what FSDP gathers.
        return (weights + adapted * (sharded / dp_shard + whole),
                f"parameters (adapters fp32, frozen base {frozen_dtype}, adapted weights 4-bit {q})", sharded + whole)
