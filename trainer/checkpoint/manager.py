"""Saving, committing, pruning and restoring distributed checkpoints.

Save: every rank writes its shards into step-N.partial/ (synchronously, or from a background thread
after staging a copy). Rank 0 renames it to step-N/, and deletes the oldest complete ones beyond
keep_last, once the writes are done AND the step after N trained to a finite loss: the state after step
N is what step N+1's loss is computed from, so a non-finite loss there means step-N holds a state that
diverged, and it is discarded instead. The last step's checkpoint and a preemption's are committed at
once (no step follows them). A crash at any moment leaves the previous step-M/ intact, and the
half-written .partial directory is removed at the next start.
"""

import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trainer.checkpoint.paths import (
    checkpoint_root, complete_steps, earlier_hint, latest_step_dir, partial_dir, remove_partials, step_dir,
)
from trainer.checkpoint.manifest import verify, write_manifest
from trainer.checkpoint.safe_reader import SafeFileSystemReader, load_safely
from trainer.config.schema import CheckpointConfig
from trainer.errors import CheckpointError, describe
from trainer.run_record import RunRecord


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, output_dir: Path, state: dict, *, is_main: bool, total_steps: int,
                 fixed: dict | None = None, record: RunRecord | None = None):
        """`state`: the Stateful objects and plain entries of a run; `fixed`: the converters' FixedEntry by
        key, saved with it and compared at every resume."""
        self.fixed = fixed or {}
        self.state = {**state, **{key: {"json": entry.json} for key, entry in self.fixed.items()}}
        self.cfg, self.is_main, self.total_steps = cfg, is_main, total_steps
        self.record = record or RunRecord(None)
        self.root = checkpoint_root(output_dir)
        self.pending = None  # a written (or still writing) checkpoint that is not committed yet
        self.async_group = None
        if cfg.async_save and dist.is_initialized():
            # The background save runs collectives of its own: on a separate group they never
            # interleave with the training step's.
            self.async_group = dist.new_group(backend="gloo")
        self.last_blocked_seconds = 0.0
        self.committing: threading.Thread | None = None  # rank 0's checksums and rename of the last save
        self.commit_error: BaseException | None = None

    # ---- restore -------------------------------------------------------------------------------

    def resume(self) -> int:
        """Loads the checkpoint `resume_from` names, if any; returns the step to continue after."""
        if self.is_main:
            for path in remove_partials(self.root):
                print(f"checkpoint: removed the incomplete {path.name} (a save was interrupted)", flush=True)
        _barrier()
        path = resume_path(self.cfg, self.root)
        if path is None:
            return 0
        saved = read_metadata(path, self.root).state_dict_metadata
        model_only = self.cfg.load_only_model or not any(key.startswith("optimizer.") for key in saved)
        keys = ("model",) if model_only else tuple(self.state)
        shapes = {name: tuple(t.shape) for name, t in self.state["model"].state_dict().items()}
        check_fits(path, saved, shapes, self.fixed)
        if "optimizer" in keys:
            self.state["optimizer"].loading_from(saved)
        load_safely({k: self.state[k] for k in keys}, path, no_dist=not dist.is_initialized(),
                    what=f"{path}: cannot be loaded", hint=earlier_hint(path, self.root))
        if self.is_main:
            what = "model weights only" if model_only else "model, optimizer, schedule, data position, RNG"
            print(f"checkpoint: resumed from {path} ({what})", flush=True)
        return 0 if model_only else self.state["train"].step

    # ---- save ----------------------------------------------------------------------------------

    def maybe_save(self, step: int, *, healthy: bool = True, force: bool = False) -> bool:
        """Called after every step: settles the checkpoint written before it (commit if this step was
        healthy, discard if not), then saves when due (or forced, on preemption). A step whose loss was
        not finite is never saved. Returns whether a checkpoint of this step was written."""
        self._settle(healthy)
        if not (self.cfg.enabled and healthy):
            return False
        final = force or step == self.total_steps
        if final or step % self.cfg.interval == 0:
            self.save(step, blocking=force or not self.cfg.async_save)
            if final:
                self.wait()  # nothing follows to confirm it
            return True
        return False

    def save(self, step: int, blocking: bool, model_only: bool = False) -> None:
        """Writes step-N.partial; wait() or a healthy next step commits it."""
        self.wait()  # one save in flight at a time
        start = time.perf_counter()
        target = partial_dir(self.root, step)
        if self.is_main:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        _barrier()
        # A seed checkpoint (model only) still says what it is: the shape, and what converters built it over,
        # so that model.init_from can read it like any other checkpoint.
        plain = [k for k, v in self.state.items() if isinstance(v, dict)]
        state = {k: self.state[k] for k in ("model", *plain)} if model_only else self.state
        finished = []  # when the write ended, for the report
        if blocking:
            with warnings.catch_warnings():
                # A single process saves without a process group on purpose; DCP warns about it anyway.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, checkpoint_id=str(target), no_dist=not dist.is_initialized())
            finished.append(time.perf_counter())
            future = None
        else:
            kwargs = {}
            if torch.cuda.is_available():
                # Stage into pinned host memory: the device-to-host copy is fast and the GPU is free at once.
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                kwargs["async_stager"] = DefaultStager(
                    StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False)
                )
            future = dcp.async_save(state, checkpoint_id=str(target), process_group=self.async_group, **kwargs)
            future.add_done_callback(lambda _: finished.append(time.perf_counter()))
        self.last_blocked_seconds = time.perf_counter() - start
        self.pending = {"future": future, "step": step, "start": start, "finished": finished, "confirmed": False}

    def wait(self) -> None:
        """Finishes the save in flight, if any, and commits it, rename included (every rank must call it)."""
        if self.pending is not None:
            self._finish_writing()
            self._commit()
        self._join_commit()

    def _finish_writing(self) -> None:
        if self.pending["future"] is not None:
            self.pending["future"].result()

    def _settle(self, healthy: bool) -> None:
        pending = self.pending
        if pending is None:
            return
        if not pending["confirmed"]:
            if not healthy:
                self._finish_writing()
                self.pending = None
                if self.is_main:
                    shutil.rmtree(partial_dir(self.root, pending["step"]), ignore_errors=True)
                    print(f"checkpoint: discarded step-{pending['step']}: the step after it did not train to a finite "
                          f"loss, so it may hold a diverged state", flush=True)
                return
            pending["confirmed"] = True
        # Only rank 0 renames, and its future finishes only after the metadata that closes the save,
        # which is written once every rank has reported its shards written.
        if pending["future"] is None or pending["future"].done():
            self._finish_writing()
            self._commit()  # the checksums and the rename go on beside the next step

    def _commit(self) -> None:
        """Rank 0 checksums the written files into the manifest, then renames step-N.partial to step-N, on a
        thread of its own: training goes on meanwhile, and a crash before the rename leaves an incomplete
        step that the next start removes, as a crash during the write does."""
        pending, self.pending = self.pending, None
        if not self.is_main:
            return
        self._join_commit()  # one commit at a time, in step order
        write_seconds = (pending["finished"][0] if pending["finished"] else time.perf_counter()) - pending["start"]
        self.committing = threading.Thread(target=self._finish_commit, name="checkpoint-commit",
                                           args=(pending["step"], write_seconds, self.last_blocked_seconds))
        self.committing.start()

    def _join_commit(self) -> None:
        if self.committing is not None:
            self.committing.join()
            self.committing = None
        if self.commit_error is not None:
            error, self.commit_error = self.commit_error, None
            raise error

    def _finish_commit(self, step: int, write_seconds: float, blocked_seconds: float) -> None:
        try:
            self._rename_with_manifest(step, write_seconds, blocked_seconds)
        except BaseException as e:  # raised on the training thread by the next join
            self.commit_error = e

    def _rename_with_manifest(self, step: int, write_seconds: float, blocked_seconds: float) -> None:
        final = step_dir(self.root, step)
        if final.exists():
            shutil.rmtree(final)  # a run restarted with resume_from=none writes the same steps again
        checksummed = time.perf_counter()
        write_manifest(partial_dir(self.root, step))
        checksum_seconds = time.perf_counter() - checksummed
        partial_dir(self.root, step).rename(final)
        size = sum(f.stat().st_size for f in final.iterdir()) / 2**20
        self.record.write("checkpoint", step, mib=size, blocked_s=blocked_seconds, written_s=write_seconds,
                          checksum_s=checksum_seconds)
        print(
            f"checkpoint: {final.name} complete: {size:.1f} MiB, training blocked {blocked_seconds:.3f} s, "
            f"written in {write_seconds:.3f} s, checksummed in {checksum_seconds:.3f} s",
            flush=True,
        )
        if self.cfg.keep_last:
            for old in complete_steps(self.root)[: -self.cfg.keep_last]:
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)


def resume_path(cfg: CheckpointConfig, root: Path) -> Path | None:
    """The checkpoint a start resumes from, or None to start at step 0."""
    choice = cfg.resume_from
    # With checkpointing off, old checkpoints in output_dir are not picked up behind the user's back;
    # a path given explicitly still is.
    if choice == "none" or (choice == "latest" and not cfg.enabled):
        return None
    if choice == "latest":
        return latest_step_dir(root)
    path = Path(choice)
    if not (path / ".metadata").is_file():
        what = "no such directory" if not path.exists() else "not a complete checkpoint (no .metadata)"
        raise CheckpointError(f"checkpoint.resume_from={path}: {what}. {earlier_hint(path, root)}")
    return path


def read_metadata(path: Path, root: Path):
    verify(path)
    try:
        return SafeFileSystemReader(str(path)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{path}/.metadata: cannot be read ({describe(e)}). {earlier_hint(path, root)}") from None


_START_FRESH = "start fresh with checkpoint.resume_from=none (or another job.output_dir)"


def check_fits(path: Path, saved: dict, shapes: dict[str, tuple], fixed: dict) -> None:
    """Compares what the run was built over (`fixed`: the converters' FixedEntry by key) and the tensor
    names and shapes with this run's before loading, to name the first that differs."""
    for key, ours in fixed.items():
        if f"{key}.json" not in saved:
            continue
        entry = {key: {"json": ""}}
        load_safely(entry, path, no_dist=True, what=f"{path}: cannot read its {key} entry")
        if entry[key]["json"] != ours.json:
            raise CheckpointError(f"{path}: " + ours.mismatch.format(saved=entry[key]["json"], ours=ours.json))
    for name, shape in shapes.items():
        key = f"model.{name}"
        entry = saved.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(
                f"{path}: has no tensor {key}: it is from a different model (another run in this output_dir?); "
                f"{_START_FRESH}"
            )
        if tuple(entry.size) != tuple(shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(entry.size)} but this model's is {tuple(shape)}: the checkpoint is "
                f"from a different model shape: check model.* in the config, or {_START_FRESH}"
            )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
