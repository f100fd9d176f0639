"""`python train.py --config X --check [--world-size N]`: everything that can be wrong before training,
checked in one process and on the meta device, with nothing written. Launchers run it before they
start N ranks: a mistake is then one line, not one per rank followed by torchrun's own traceback."""

from pathlib import Path

from trainer.checkpoint.manager import check_fits, read_metadata, resume_path
from trainer.checkpoint.paths import checkpoint_root
from trainer.config import Config
from trainer.converters import convert
from trainer.data import check_enough_tokens, load_documents
from trainer.data.held_out import check_eval_tokens, training_and_eval_documents
from trainer.model.build import build_meta_model
from trainer.plan import make_plan


def check_run(cfg: Config, world_size: int) -> str:
    """Raises the first UserError a start of this config on `world_size` ranks would; else a summary."""
    plan = make_plan(cfg, world_size)
    docs, held_out = training_and_eval_documents(cfg, load_documents)
    check_enough_tokens(docs, plan.tokenizer, cfg.data, cfg.training.seq_len)
    if held_out is not None:
        check_eval_tokens(held_out, plan.tokenizer, cfg)
    start = "a fresh start at step 0"
    root = checkpoint_root(Path(cfg.job.output_dir))
    path = None if cfg.checkpoint.create_seed else resume_path(cfg.checkpoint, root)
    if path is not None:
        saved = read_metadata(path, root).state_dict_metadata
        model = convert(build_meta_model(plan.model_args), plan.converters)
        # The names and shapes a resume would load: the trainable ones alone where converters rebuild the
        # rest at every start (adapter runs), else everything.
        trainable_only = any(c.checkpoints_trainable_only for c in plan.converters)
        params = dict(model.named_parameters())
        shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()
                  if not trainable_only or (n in params and params[n].requires_grad)}
        entries = {k: v for c in plan.converters for k, v in c.checkpoint_entries().items()}
        check_fits(path, saved, shapes, entries["base"]["json"] if "base" in entries else None)
        start = f"a resume from {path}"
        counters = {k for k in saved if k.startswith("train.")}
        if not counters:
            start += " (model weights only)"
    d = plan.dims
    return (
        f"check: ok: {cfg.job.output_dir} on {world_size} rank(s) (pp {d.pp} x dp_replicate {d.dp_replicate} x "
        f"dp_shard {d.dp_shard} x tp {d.tp}), {len(docs):,} documents from {docs.name}, "
        + (f"validating on {len(held_out):,} documents ({held_out.name}), " if held_out is not None else "")
        + (f"distilling from {cfg.distill.teacher}, " if plan.teacher_args is not None else "")
        + start
    )
