"""Prepared token shards: a dataset tokenized once (python -m trainer.data.prepare), read by memory map.

A prepared directory holds `prepared.json` (the manifest) and per shard three flat little-endian files:

    shard-00000.tokens   every document's packed tokens ([BOS] ids [EOS]), uint16 or uint32, back to back
    shard-00000.offsets  int64, documents + 1 offsets into .tokens (document i is offsets[i] .. offsets[i+1])
    shard-00000.trained  SFT only: uint8 per token, 1 where the token is trained (the assistant's), 0 if masked

Documents keep the indices they had in the source (empty and skipped records are empty documents), so a run
from shards packs exactly the windows a run from the text does: the same streams, order and state.

The manifest names the tokenizer (its fingerprint: trainer/tokenizer/identity.py), the source and the
settings the tokens depend on, counts, each file's size and xxh3 checksum, and a checksum of itself. Every
file is checked against it when a run opens the directory (xxh3 over the page cache: about 0.05 s a GB).
"""

import bisect
import json
import mmap
from pathlib import Path

import numpy as np
import xxhash

from trainer.errors import DataError
from trainer.file_digest import file_problem

MANIFEST = "prepared.json"
FORMAT = "tessera-prepared-tokens"
VERSION = 1
# The data settings the tokens depend on: a run whose settings differ would train on other tokens.
TOKEN_SETTINGS = ("task", "add_bos", "add_eos", "sft_format")


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True).encode())


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("format") == FORMAT and isinstance(manifest.get("shards"), list)
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a readable manifest of prepared tokens ({e}); prepare the data again") from None
    if not ok:
        raise DataError(f"{path}: not a manifest of prepared tokens (format {manifest.get('format')!r}); prepare the data again")
    if manifest.get("version", 0) > VERSION:
        raise DataError(f"{path}: prepared-tokens version {manifest['version']}, newer than this Tessera reads ({VERSION})")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise DataError(f"{path}: the manifest does not match its checksum (it was edited or damaged after prepare "
                        f"wrote it); prepare the data again")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Each shard file's size and checksum against the manifest; raises naming the first that differs."""
    for shard in manifest["shards"]:
        for suffix, want in shard["files"].items():
            path = directory / f"{shard['name']}.{suffix}"
            problem = file_problem(path, want)
            if problem is None:
                continue
            raise DataError(f"{path} {problem}; prepare the data again (python -m trainer.data.prepare)")


class PreparedDocuments:
    """A prepared directory as documents of token ids: len() and [i] -> an array of ids (the shard's unsigned
    dtype; SFT's int64, prompt tokens as -(id + 1), as the packed streams store them)."""

    prepared = True  # the loader takes its documents as token ids (make_tokenize)

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        verify_files(self.directory, self.manifest)
        self.name = f"prepared tokens at {self.directory} (from {self.manifest['source']['source']})"
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sft = self.manifest["settings"]["task"] == "sft"
        counts = [s["documents"] for s in self.manifest["shards"]]
        self.first_doc = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open: dict[int, tuple] = {}
        self._firsts = self.first_doc.tolist()
        self._last = (0, 0, 0)  # (first, end, shard) of the shard the last document came from

    def __len__(self) -> int:
        return int(self.first_doc[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def _shard(self, k: int) -> tuple:
        if k not in self._open:
            name = self.directory / self.manifest["shards"][k]["name"]
            tokens = _map(f"{name}.tokens", self.dtype)
            offsets = np.fromfile(f"{name}.offsets", dtype="<i8")
            trained = _map(f"{name}.trained", np.uint8) if self.sft else None
            self._open[k] = (tokens, offsets, trained)
        return self._open[k]

    def __getitem__(self, i: int) -> np.ndarray:
        # Documents are asked for in runs within a shard more often than not: its bounds are kept.
        first, last, k = self._last
        if not first <= i < last:
            k = bisect.bisect_right(self._firsts, i) - 1  # a list: numpy's searchsorted costs microseconds a call
            first, last = self._firsts[k], self._firsts[k + 1]
            self._last = (first, last, k)
        tokens, offsets, trained = self._shard(k)
        a, b = offsets[i - first], offsets[i - first + 1]
        ids = tokens[a:b]  # a view of the mapped file: the window it lands in converts it once
        if trained is not None:
            ids = ids.astype(np.int64)
            ids = np.where(trained[a:b] != 0, ids, -ids - 1)
        return ids

    def check_matches(self, fingerprint: str, tokenizer_name: str, data) -> None:
        """Refuses shards made with another tokenizer or other token settings than the run's."""
        made = self.manifest["tokenizer"]
        if made["fingerprint"] != fingerprint:
            raise DataError(
                f"data.source={self.directory}: its tokens were made with {made['name']} (fingerprint "
                f"{made['fingerprint']}), not this run's tokenizer, {tokenizer_name} ({fingerprint}); prepare it again "
                f"with this run's tokenizer, or set the tokenizer section to the one that made it")
        for key in TOKEN_SETTINGS:
            if key == "sft_format" and self.manifest["settings"]["task"] != "sft":
                continue
            theirs, ours = self.manifest["settings"][key], getattr(data, key)
            if theirs != ours and not (key == "sft_format" and ours == "auto"):
                raise DataError(f"data.source={self.directory}: its tokens were made with data.{key}={theirs}, this run "
                                f"has data.{key}={ours}; set data.{key}={theirs}, or prepare the data again")


def _map(path: str, dtype) -> np.ndarray:
    """The file as a read-only array over its pages (a plain ndarray over an mmap: np.memmap's slices cost
    microseconds each in its subclass hooks, a document read cost one)."""
    if Path(path).stat().st_size == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype)
