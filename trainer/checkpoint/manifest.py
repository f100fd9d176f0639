"""A checkpoint's manifest: every file of a step with its size and xxh3-64 checksum, written by rank 0 when
it commits the step, and verified before anything reads the step (resume, init_from, exports, generation,
a distillation teacher, --check), since torch.distributed.checkpoint stores no checksums: a truncated
.distcp past the model's bytes, or a flipped byte inside a tensor, would otherwise load as wrong weights.

xxh3-64 because it costs little next to the write: 17 GB/s on one core of the 2-core CPU machine, against
crc32's 3.8 and blake2b's 0.9 (docs/performance.md). Checkpoints written before manifests load, with a note.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from trainer.checkpoint.paths import earlier_hint
from trainer.errors import CheckpointError
from trainer.file_digest import file_digest, file_problem

MANIFEST = "manifest.json"
# What a checkpoint's state dict holds and how (trainer/checkpoint/state.py's keys and layouts). A change that
# older code could not read, or that could not read older checkpoints as they are, raises it and adds a
# conversion; tests/fixtures/checkpoint-format-1 (resumed by tests/e2e/test_checkpoint_compat.py) keeps the
# promise for format 1. Checkpoints written before the number existed are format 1.
CHECKPOINT_FORMAT = 1
_verified: set[tuple[str, int]] = set()  # (step directory, its manifest's mtime): each verified once a process


def write_manifest(directory: Path) -> None:
    files = {f.name: {"bytes": f.stat().st_size, "xxh3_64": file_digest(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": 1, "checkpoint_format": CHECKPOINT_FORMAT, "files": files}, indent=1))


def verify(directory: str | Path) -> None:
    """Raises CheckpointError naming the first file whose size or checksum differs from the manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        key = (str(directory.resolve()), 0)
        if key not in _verified and (directory / ".metadata").is_file():
            _verified.add(key)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"note: {directory} has no {MANIFEST} (written before checkpoints carried checksums): its files are "
                      f"not verified", file=sys.stderr, flush=True)
        return
    key = (str(directory.resolve()), manifest.stat().st_mtime_ns)
    if key in _verified:
        return
    try:
        written = json.loads(manifest.read_text())
        files, checkpoint_format = written["files"], int(written.get("checkpoint_format", 1))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{manifest}: not a readable manifest ({e}). {earlier_hint(directory, directory.parent)}") from None
    if checkpoint_format > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{directory} is checkpoint format {checkpoint_format}, written by a newer Tessera than this "
                              f"one (which reads formats up to {CHECKPOINT_FORMAT}): run a version that wrote it, or newer")
    for name, want in files.items():
        path = directory / name
        problem = file_problem(path, want)
        if problem:
            raise CheckpointError(f"{path} {problem}: the checkpoint is damaged. {earlier_hint(directory, directory.parent)}")
    _verified.add(key)
