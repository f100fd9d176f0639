"""What a run writes for others: a Hugging Face checkpoint (and, through the converters, the PEFT adapter
and its base), each directory with the tokenizer, and one console line per directory saying what went
where. At the end of a run (export_run, fed by the run's in-memory model), or from any checkpoint later:

    python -m trainer.export CHECKPOINT OUT_DIR [--dtype bfloat16|float32] [--peft]
    python -m trainer.export CHECKPOINT OUT_DIR --quantized w4a16|w8a8_int8|w8a8_fp8 [--compute-dtype ...]

CHECKPOINT is a run's checkpoints/step-N directory, or the run directory (its latest complete checkpoint).
A checkpoint of plain weights, in any layout (pipeline stages too), is read one parameter at a time. An
adapter run's checkpoint holds only the adapters: the model is rebuilt on CPU from the run's config (its
base from model.init_from, as at the run's start) and written with the adapters merged, or with --peft as
OUT_DIR/peft in PEFT's format over OUT_DIR/base. --quantized writes a quantized export instead
(trainer/qat/export.py): after a QAT run, the quantization it trained; otherwise post-training quantization.
"""

import dataclasses
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.build import load_run_model
from trainer.checkpoint.paths import checkpoint_root, latest_step_dir, step_dir
from trainer.cli import Parser, run_command
from trainer.config import Config, load_config
from trainer.config.schema import QATConfig, TokenizerConfig
from trainer.converters import ModelConverter, build_converters
from trainer.converters.qat import QATConverter
from trainer.errors import CheckpointError, UserError
from trainer.plan import Plan
from trainer.precision import Precision
from trainer.qat.export import FORMATS, quantized_writing
from trainer.tokenizer import build_tokenizer
from trainer.tokenizer.export import export_tokenizer
from trainer.weights.dcp_import import is_dcp_dir, read_dcp_args
from trainer.weights.hf_export import export_checkpoint_hf, export_hf


def export_run(plan: Plan, parts: list[nn.Module], *, pipelined: bool, step: int, is_main: bool,
               compute_dtype: torch.dtype) -> None:
    """Every rank calls it: the gathers of sharded weights are collectives. `compute_dtype`: the dtype the
    training forward computed in (the quantized exports round the weights as it saw them)."""
    cfg, converters = plan.cfg, plan.converters
    dtype = torch.bfloat16 if cfg.export.dtype == "bfloat16" else torch.float32
    output_dir = Path(cfg.job.output_dir)
    ids = {"bos_id": plan.tokenizer.bos_id, "eos_id": plan.tokenizer.eos_id}
    written = {}
    if not pipelined:
        if cfg.export.hf or cfg.export.peft:
            written = export_model(parts[0], output_dir / "export", converters, dtype=dtype, token_ids=ids)
        for name in cfg.export.quantized:
            written.update(export_quantized(parts[0], plan.model_args, output_dir / "export" / name, converters, cfg.qat,
                                            name, dtype=dtype, compute_dtype=compute_dtype, token_ids=ids))
    else:
        # Pipeline stages live on different ranks: rank 0 assembles the export from the final checkpoint,
        # rebuilding what a converter's checkpoints leave out as at the start (adapters), or else reading
        # one tensor at a time.
        if is_main:
            path = step_dir(checkpoint_root(output_dir), step)
            if any(c.checkpoints_trainable_only for c in converters):
                model = load_run_model(path)
                if cfg.export.hf or cfg.export.peft:
                    written = export_model(model, output_dir / "export", converters, dtype=dtype, token_ids=ids)
                for name in cfg.export.quantized:
                    written.update(export_quantized(model, plan.model_args, output_dir / "export" / name, converters, cfg.qat,
                                                    name, dtype=dtype, compute_dtype=compute_dtype, token_ids=ids))
            else:
                if cfg.export.hf:
                    out = output_dir / "export" / "hf"
                    export_checkpoint_hf(path, out, dtype, **ids)
                    written = {out: "Hugging Face checkpoint"}
                for name in cfg.export.quantized:
                    out = output_dir / "export" / name
                    export_checkpoint_hf(path, out, dtype, **ids, **quantized_writing(plan.model_args, cfg.qat, FORMATS[name], compute_dtype))
                    written[out] = quantized_words(cfg.qat.group_size, name, converters)
        dist.barrier()
    if is_main:
        announce(written, cfg.tokenizer, cfg.export.dtype)


def quantized_words(group_size: int, name: str, converters: list[ModelConverter]) -> str:
    """What a quantized export holds, for its console line: the rounding QAT trained, or PTQ."""
    fmt = FORMATS[name]
    rounding = next((c.scheme for c in converters if isinstance(c, QATConverter)), None)
    trained = rounding is not None and (rounding.weight, rounding.per_group) == (fmt.scheme.weight, fmt.scheme.per_group)
    group = f" of {group_size}" if fmt.scheme.per_group else ""
    how = f"the weights' rounding trained by QAT ({rounding.name})" if trained else "post-training quantization"
    return f"{fmt.words}{group}, compressed-tensors, {how}"


def export_quantized(model: nn.Module, args, out: Path, converters: list[ModelConverter], qat: QATConfig, name: str, *,
                     dtype: torch.dtype, compute_dtype: torch.dtype, token_ids: dict) -> dict[Path, str]:
    """One quantized export of a live model (any layout without pipeline stages; every rank calls it)."""
    tensors = next((t for c in converters if (t := c.export_tensors(model)) is not None), None)
    export_hf(model, out, dtype=dtype, tensors=tensors, **token_ids,
              **quantized_writing(args, qat, FORMATS[name], compute_dtype))
    return {out: quantized_words(qat.group_size, name, converters)}


def export_model(model: nn.Module, export_dir: Path, converters: list[ModelConverter], *, dtype: torch.dtype,
                 token_ids: dict) -> dict[Path, str]:
    """Writes the exports; returns {directory: what it holds}. A converter may write its own instead."""
    for converter in converters:
        written = converter.export(model, export_dir, dtype=dtype, token_ids=token_ids)
        if written is not None:
            return written
    export_hf(model, export_dir / "hf", dtype=dtype, **token_ids)
    return {export_dir / "hf": "Hugging Face checkpoint"}


def announce(written: dict[Path, str], tokenizer: TokenizerConfig | None, dtype: str) -> None:
    """The tokenizer into every directory written (a PEFT adapter's too, so that each is usable on its
    own), and one line for each."""
    for path, what in written.items():
        if tokenizer is None:
            note = ", no tokenizer: the run's config.yaml was not found"
        else:
            files = export_tokenizer(tokenizer, path)
            note = f", tokenizer {' '.join(files)}" if files else ", no tokenizer file (the byte tokenizer has none)"
        print(f"export: {path}: {what} ({dtype}{note})", flush=True)


def _step_of(path: Path) -> Path:
    """The checkpoint directory CHECKPOINT names: itself, or a run directory's latest complete one."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory; give a run's checkpoints/step-N directory or the run directory")
    if (path / "config.yaml").is_file():
        latest = latest_step_dir(checkpoint_root(path))
        if latest is None:
            raise CheckpointError(f"{path}: the run has no complete checkpoint under {checkpoint_root(path)}")
        return latest
    if not is_dcp_dir(path):
        raise CheckpointError(f"{path} is not one of our checkpoints (it has no .metadata): give a run's "
                              f"checkpoints/step-N directory or the run directory")
    return path


def _check_out(out: Path, step: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT_DIR {out} is a file: give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"OUT_DIR {out} holds files already: give a new or empty directory (exports are not merged)")
    root = step.resolve().parent
    if out.resolve().is_relative_to(root):
        raise UserError(f"OUT_DIR {out} is inside {root}, where checkpoints live: write the export elsewhere "
                        f"(e.g. {root.parent / 'export'})")


def export_checkpoint(path: Path, out: Path, dtype_name: str, peft: bool, quantized: str | None = None,
                      compute_dtype: str | None = None) -> tuple[dict[Path, str], TokenizerConfig | None]:
    """Writes the export(s); returns {directory: what it holds} and the run's tokenizer (None when the
    checkpoint was moved away from its run's config.yaml)."""
    step = _step_of(path)
    _check_out(out, step)
    config_file = step.parent.parent / "config.yaml"
    cfg: Config | None = load_config(config_file) if config_file.is_file() else None
    if quantized is not None:
        if cfg is None:
            raise UserError(f"--quantized: {step} is no longer beside its run's config.yaml, which says which layers QAT "
                            f"rounded and how: export from the run's own directory")
        return _export_checkpoint_quantized(step, out, build_converters(cfg), cfg.qat, cfg.tokenizer,
                                            cfg.training.mixed_precision_param, dtype_name, quantized, compute_dtype)
    converters = build_converters(dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, hf=not peft, peft=peft))) if cfg else []
    rebuilt = [c for c in converters if c.checkpoints_trainable_only]
    if peft and not rebuilt:
        raise UserError(f"--peft: {step} is not an adapter run's checkpoint (its run trains every weight); leave --peft out")
    tokenizer = build_tokenizer(cfg.tokenizer) if cfg is not None else None
    ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id} if tokenizer is not None else {}
    dtype = getattr(torch, dtype_name)
    tokenizer_cfg = cfg.tokenizer if cfg is not None else None
    if not rebuilt:
        export_checkpoint_hf(step, out, dtype, **ids)
        return {out: f"Hugging Face checkpoint of {step}"}, tokenizer_cfg
    model = load_run_model(step)
    if peft:  # OUT_DIR/peft and OUT_DIR/base, the adapter naming where its base is
        written = export_model(model, out, converters, dtype=dtype, token_ids=ids)
        return {p: f"{what}, from {step}" for p, what in written.items()}, tokenizer_cfg
    # Merged: written where the converter writes a run's export/hf, then moved to OUT_DIR.
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    [(merged, what)] = export_model(model, staging, converters, dtype=dtype, token_ids=ids).items()
    if out.is_dir():
        out.rmdir()  # empty: checked above
    merged.rename(out)
    shutil.rmtree(staging)
    return {out: f"{what}, from {step}"}, tokenizer_cfg


def _export_checkpoint_quantized(step: Path, out: Path, converters: list[ModelConverter], qat: QATConfig, tokenizer_cfg: TokenizerConfig,
                                 param_precision: str, dtype_name: str, name: str,
                                 compute_dtype: str | None) -> tuple[dict[Path, str], TokenizerConfig]:
    if compute_dtype is None:  # as the run computed where its config says; for auto, as this machine would
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        writing_dtype = Precision.from_config(param_precision, "float32", device).param_dtype
    else:
        writing_dtype = getattr(torch, compute_dtype)
    compute_dtype = str(writing_dtype).removeprefix("torch.")
    tokenizer = build_tokenizer(tokenizer_cfg)
    ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    dtype = getattr(torch, dtype_name)
    if any(c.checkpoints_trainable_only for c in converters):
        model = load_run_model(step)
        export_quantized(model, model.args, out, converters, qat, name, dtype=dtype, compute_dtype=writing_dtype, token_ids=ids)
    else:
        export_checkpoint_hf(step, out, dtype, **ids, **quantized_writing(read_dcp_args(step), qat, FORMATS[name], writing_dtype))
    return {out: f"{quantized_words(qat.group_size, name, converters)}, rounded from {compute_dtype} weights, from {step}"}, tokenizer_cfg


def main(argv: list[str]) -> int:
    parser = Parser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoints/step-N, or the run directory (its latest)")
    parser.add_argument("out_dir", type=Path, help="a new or empty directory")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--peft", action="store_true",
                        help="an adapter run: OUT_DIR/peft (PEFT's format) over OUT_DIR/base, instead of merged")
    parser.add_argument("--quantized", choices=list(FORMATS),
                        help="OUT_DIR holds this quantized export (compressed-tensors) instead of the plain one")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"],
                        help="with --quantized: the dtype the run's forward computed in, whose weights QAT rounded "
                             "(default: the run's training.mixed_precision_param; auto: as this machine would train)")
    args = parser.parse_args(argv)
    if args.peft and args.quantized:
        raise UserError("--peft and --quantized write different exports: give one of them")
    written, tokenizer = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.peft, args.quantized,
                                           args.compute_dtype)
    announce(written, tokenizer, args.dtype)
    return 0


if __name__ == "__main__":
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()
    sys.exit(run_command(main, sys.argv[1:]))
