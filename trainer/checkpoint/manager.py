"""Saving, committing, pruning and restoring distributed checkpoints.

Save: every rank writes its shards into step-N.partial/ (synchronously, or from a background thread
after staging a copy); when all ranks are done, rank 0 renames it to step-N/ and deletes the oldest
complete ones beyond keep_last. A crash at any moment leaves the previous step-M/ intact, and the
half-written .partial directory is removed at the next start.
"""

import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trainer.checkpoint.paths import checkpoint_root, complete_steps, partial_dir, remove_partials, step_dir, step_of
from trainer.checkpoint.safe_reader import SafeFileSystemReader
from trainer.checkpoint.state import LOAD_ERRORS, SafeLoadPlanner
from trainer.config.schema import CheckpointConfig
from trainer.weights.errors import CheckpointError


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, output_dir: Path, state: dict, *, is_main: bool, total_steps: int):
        self.cfg, self.state, self.is_main, self.total_steps = cfg, state, is_main, total_steps
        self.root = checkpoint_root(output_dir)
        self.pending = None  # (future, step) of an async save in flight
        self.async_group = None
        if cfg.async_save and dist.is_initialized():
            # The background save runs collectives of its own: on a separate group they never
            # interleave with the training step's.
            self.async_group = dist.new_group(backend="gloo")
        self.last_blocked_seconds = 0.0

    # ---- restore -------------------------------------------------------------------------------

    def resume(self) -> int:
        """Loads the checkpoint `resume_from` names, if any; returns the step to continue after."""
        if self.is_main:
            for path in remove_partials(self.root):
                print(f"checkpoint: removed the incomplete {path.name} (a save was interrupted)", flush=True)
        _barrier()
        path = self._resume_path()
        if path is None:
            return 0
        saved = self._read_metadata(path).state_dict_metadata
        model_only = self.cfg.load_only_model or not any(key.startswith("optimizer.") for key in saved)
        keys = ("model",) if model_only else tuple(self.state)
        self._check_fits(path, saved)
        try:
            dcp.load(
                {k: self.state[k] for k in keys}, storage_reader=SafeFileSystemReader(str(path)),
                planner=SafeLoadPlanner(), no_dist=not dist.is_initialized(),
            )
        except LOAD_ERRORS as e:
            raise CheckpointError(
                f"{path}: cannot be loaded ({_one_line(e)}). {self._earlier_hint(path)}"
            ) from None
        if self.is_main:
            what = "model weights only" if model_only else "model, optimizer, schedule, data position, RNG"
            print(f"checkpoint: resumed from {path} ({what})", flush=True)
        return 0 if model_only else self.state["train"].step

    def _resume_path(self) -> Path | None:
        choice = self.cfg.resume_from
        # With checkpointing off, old checkpoints in output_dir are not picked up behind the user's back;
        # a path given explicitly still is.
        if choice == "none" or (choice == "latest" and not self.cfg.enabled):
            return None
        if choice == "latest":
            steps = complete_steps(self.root)
            return step_dir(self.root, steps[-1]) if steps else None
        path = Path(choice)
        if not (path / ".metadata").is_file():
            what = "no such directory" if not path.exists() else "not a complete checkpoint (no .metadata)"
            raise CheckpointError(f"checkpoint.resume_from={path}: {what}. {self._earlier_hint(path)}")
        return path

    def _read_metadata(self, path: Path):
        try:
            return SafeFileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{path}/.metadata: cannot be read ({_one_line(e)}). {self._earlier_hint(path)}") from None

    def _check_fits(self, path: Path, saved: dict) -> None:
        """Compares the adapter run's base and the tensor shapes with this run's before loading, to name
        the first that differs."""
        if "base" in self.state and "base.json" in saved:
            entry = {"base": {"json": ""}}
            dcp.load(entry, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=True)
            if entry["base"]["json"] != self.state["base"]["json"]:
                raise CheckpointError(
                    f"{path}: its adapters were trained over the base {entry['base']['json']}, but this run's base is "
                    f"{self.state['base']['json']}: set model.init_from / adapters.quantize_base back, or start over "
                    f"(a new job.output_dir, or checkpoint.resume_from=none)"
                )
        for name, tensor in self.state["model"].state_dict().items():
            key = f"model.{name}"
            entry = saved.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointError(f"{path}: has no tensor {key}: it is from a different model")
            if tuple(entry.size) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(entry.size)} but this model's is {tuple(tensor.shape)}: "
                    f"the checkpoint is from a different model shape (check model.* in the config)"
                )

    def _earlier_hint(self, path: Path) -> str:
        step = step_of(path)
        earlier = [s for s in complete_steps(self.root) if step is None or s < step]
        if earlier:
            return f"The previous complete checkpoint is {step_dir(self.root, earlier[-1])}: resume from it with checkpoint.resume_from=<that path>"
        return "No earlier complete checkpoint exists; start over with checkpoint.resume_from=none"

    # ---- save ----------------------------------------------------------------------------------

    def maybe_save(self, step: int, force: bool = False) -> bool:
        """Saves when due (or forced, on preemption); returns whether a checkpoint was written."""
        self._commit_if_done()
        if not self.cfg.enabled:
            return False
        if force or step % self.cfg.interval == 0 or step == self.total_steps:
            self.save(step, blocking=force or not self.cfg.async_save)
            return True
        return False

    def save(self, step: int, blocking: bool, model_only: bool = False) -> None:
        self.wait()  # one save in flight at a time
        start = time.perf_counter()
        target = partial_dir(self.root, step)
        if self.is_main:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        _barrier()
        state = {"model": self.state["model"]} if model_only else self.state
        if blocking:
            with warnings.catch_warnings():
                # A single process saves without a process group on purpose; DCP warns about it anyway.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, checkpoint_id=str(target), no_dist=not dist.is_initialized())
            self.last_blocked_seconds = time.perf_counter() - start
            self._commit(step, time.perf_counter() - start)
        else:
            kwargs = {}
            if torch.cuda.is_available():
                # Stage into pinned host memory: the device-to-host copy is fast and the GPU is free at once.
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

                kwargs["async_stager"] = DefaultStager(
                    StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False)
                )
            future = dcp.async_save(state, checkpoint_id=str(target), process_group=self.async_group, **kwargs)
            finished = []  # when the background write ended, for the report (commits happen later)
            future.add_done_callback(lambda _: finished.append(time.perf_counter()))
            self.pending = (future, step, start, finished)
            self.last_blocked_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Finishes the async save in flight, if any (every rank must call it)."""
        if self.pending is not None:
            future, step, start, finished = self.pending
            future.result()
            self._commit(step, (finished[0] if finished else time.perf_counter()) - start)

    def _commit_if_done(self) -> None:
        # Only rank 0 renames, and its future finishes only after the metadata that closes the save,
        # which is written once every rank has reported its shards written.
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def _commit(self, step: int, write_seconds: float) -> None:
        self.pending = None
        if not self.is_main:
            return
        final = step_dir(self.root, step)
        if final.exists():
            shutil.rmtree(final)  # a run restarted with resume_from=none writes the same steps again
        partial_dir(self.root, step).rename(final)
        size = sum(f.stat().st_size for f in final.iterdir()) / 2**20
        print(
            f"checkpoint: {final.name} complete: {size:.1f} MiB, training blocked {self.last_blocked_seconds:.3f} s, "
            f"written in {write_seconds:.3f} s",
            flush=True,
        )
        if self.cfg.keep_last:
            for old in complete_steps(self.root)[: -self.cfg.keep_last]:
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _one_line(e: BaseException) -> str:
    """The innermost error of a message; DCP wraps each rank's failure in a whole traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if ":" in line and line.split(":")[0].replace(".", "").replace("_", "").isalnum()
              and line.split(":")[0].endswith(("Error", "Exception"))]
    return (errors[-1] if errors else " ".join(lines))[:400]
