"""Reading checkpoints that someone else may have written, without running their code.

DCP pickles a checkpoint's .metadata and unpickles it with plain pickle.load, which would run any code a
crafted file names. This reader admits only the classes a DCP metadata file is made of (DCP's own
metadata records, torch sizes, dtypes and layouts, paths, plain containers) and refuses anything else.
`load_safely` is the one way the project loads a DCP checkpoint: this reader, a planner that unpickles
values with weights_only=True, and one error line naming the checkpoint.
"""

import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from trainer.checkpoint.manifest import verify
from trainer.errors import CheckpointError, describe

# DCP reports failures on any rank as CheckpointException, which derives from BaseException.
LOAD_ERRORS = (Exception, CheckpointException)

_ALLOWED = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "tuple", "list", "dict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" and hasattr(dcp_metadata, name):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a checkpoint's metadata")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles non-tensor values with weights_only=False; a checkpoint may come from anyone, so
    only plain values (numbers, strings, lists, dicts, tensors) are accepted here."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise ValueError(
                f"checkpoint entry {read_item.dest_index.fqn} cannot be read as a plain value ({type(e).__name__}: {e}): "
                f"the file is damaged, or holds objects other than numbers, strings and tensors"
            ) from None
        super().load_bytes(read_item, _reserialize(obj))


def _reserialize(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def load_safely(state: dict, path: str | Path, *, no_dist: bool, what: str, hint: str = "") -> None:
    """dcp.load of `state` from the checkpoint at `path`; any failure is a CheckpointError reading
    "{what} ({the innermost error}). {hint}", and DCP's warnings before it are not shown."""
    verify(path)  # sizes and checksums against the manifest, before any byte is read
    reader = SafeFileSystemReader(str(path))
    try:
        # Read first on its own: DCP logs whole tracebacks while it falls back from a bad .metadata.
        reader.read_metadata()
    except Exception as e:
        raise CheckpointError(f"{what} ({path}/.metadata: {describe(e)}){'. ' + hint if hint else ''}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=no_dist)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{what} ({describe(e)}){'. ' + hint if hint else ''}") from None
