"""What a finished run writes for others: a Hugging Face checkpoint (and, through the converters, the
PEFT adapter and its base), each with the tokenizer, and one console line per directory saying what
went where. Fed by the run's in-memory config and model, not by files read back."""

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.build import load_run_model
from trainer.checkpoint.paths import checkpoint_root, step_dir
from trainer.converters import ModelConverter
from trainer.plan import Plan
from trainer.tokenizer.export import export_tokenizer
from trainer.weights.checkpoint_export import export_checkpoint_hf
from trainer.weights.hf_export import export_hf


def export_run(plan: Plan, parts: list[nn.Module], *, pipelined: bool, step: int, is_main: bool) -> None:
    """Every rank calls it: the gathers of sharded weights are collectives."""
    cfg, converters = plan.cfg, plan.converters
    dtype = torch.bfloat16 if cfg.export.dtype == "bfloat16" else torch.float32
    output_dir = Path(cfg.job.output_dir)
    ids = {"bos_id": plan.tokenizer.bos_id, "eos_id": plan.tokenizer.eos_id}
    if not pipelined:
        written = export_model(parts[0], output_dir / "export", converters, dtype=dtype, token_ids=ids)
    else:
        # Pipeline stages live on different ranks: rank 0 assembles the export from the final checkpoint,
        # rebuilding what a converter's checkpoints leave out as at the start (adapters), or else reading
        # one tensor at a time.
        written = {}
        if is_main:
            path = step_dir(checkpoint_root(output_dir), step)
            if any(c.checkpoints_trainable_only for c in converters):
                written = export_model(load_run_model(path), output_dir / "export", converters, dtype=dtype, token_ids=ids)
            else:
                out = output_dir / "export" / "hf"
                export_checkpoint_hf(path, out, dtype, **ids)
                written = {out: "Hugging Face checkpoint"}
        dist.barrier()
    if is_main:
        for path, what in written.items():
            adapter_only = what.startswith("PEFT")  # it lives beside its base, which has the tokenizer
            files = [] if adapter_only else export_tokenizer(cfg.tokenizer, path)
            tokenizer_note = f", tokenizer {' '.join(files)}" if files else (
                "" if adapter_only else ", no tokenizer file (the byte tokenizer has none)")
            print(f"export: {path}: {what} ({cfg.export.dtype}{tokenizer_note})", flush=True)


def export_model(model: nn.Module, export_dir: Path, converters: list[ModelConverter], *, dtype: torch.dtype,
                 token_ids: dict) -> dict[Path, str]:
    """Writes the exports; returns {directory: what it holds}. A converter may write its own instead."""
    for converter in converters:
        written = converter.export(model, export_dir, dtype=dtype, token_ids=token_ids)
        if written is not None:
            return written
    export_hf(model, export_dir / "hf", dtype=dtype, **token_ids)
    return {export_dir / "hf": "Hugging Face checkpoint"}
