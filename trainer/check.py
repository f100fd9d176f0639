"""`python train.py --config X --check [--world-size N]`: everything that can be wrong before training,
checked in one process and on the meta device, with nothing written. Launchers run it before they
start N ranks: a mistake is then one line, not one per rank followed by torchrun's own traceback. The
plan is held against the machine it runs on as well (trainer/machine_fit.py), unless it is being planned
for another one."""

from pathlib import Path

from trainer.checkpoint.manager import check_fits, read_metadata, resume_path
from trainer.checkpoint.paths import checkpoint_root
from trainer.checkpoint.state import ModelState
from trainer.data.documents import check_num_streams, count_documents
from trainer.errors import UserError
from trainer.machine_fit import Machine, fit_problems
from trainer.plan import Plan, load_data


def check_run(plan: Plan, machine: Machine | None = None, ranks_here: int | None = None, elsewhere: bool = False) -> str:
    """Raises the first UserError a start of this plan would; else a summary. With `machine`, also
    why `ranks_here` of its ranks (default: all) cannot run on it: an error, or with `elsewhere` a note."""
    cfg = plan.cfg
    notes = []
    if machine is not None:
        problems = fit_problems(plan, machine, ranks_here or plan.dims.world_size)
        if problems and not elsewhere:
            raise UserError(f"this plan cannot run on this machine ({machine.describe()}): {'; '.join(problems)}. "
                            f"Change the layout, batch or model, or add --for-another-machine to check it for another one")
        notes = [f"note: planned for another machine; this one ({machine.describe()}) could not run it: {p}" for p in problems]
    docs, held_out = load_data(plan)
    check_num_streams(docs, cfg.data.num_streams, cfg.data.text_sample_by)  # what the loader would refuse
    start = "a fresh start at step 0"
    root = checkpoint_root(Path(cfg.job.output_dir))
    path = None if cfg.checkpoint.create_seed else resume_path(cfg.checkpoint, root)
    if path is not None:
        saved = read_metadata(path, root).state_dict_metadata
        # The names and shapes a resume would load: what the run's checkpoints hold.
        model = ModelState([plan.meta], "trainable" if plan.trainable_only else "all")
        check_fits(path, saved, {n: tuple(t.shape) for n, t in model.state_dict().items()}, plan.info.checkpoint_entries)
        start = f"a resume from {path}"
        if not any(k.startswith("train.") for k in saved):
            start += " (model weights only)"
    d = plan.dims
    return (
        f"check: ok: {cfg.job.output_dir} on {d.world_size} rank(s) ({d.describe()}), {count_documents(docs)} from {docs.name}, "
        + (f"validating on {count_documents(held_out)} ({held_out.name}), " if held_out is not None else "")
        + (f"distilling from {cfg.distill.teacher}, " if plan.teacher_args is not None else "")
        + start
        + "".join(f"\n{note}" for note in notes)
    )
