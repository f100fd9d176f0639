"""Document sources: an indexable list of texts, from the stdlib corpus, local files, or the Hub.

Every source is a `Documents`: len() and [i] -> str (or a record), with a `name` for error messages. Nothing
is tokenized here; that happens lazily in the packed streams. The other kinds of source (prepared tokens,
streams, mixtures) are in modules of their own; trainer/data/sources.py picks one.
"""

import codecs
import glob
import json
import os
import sysconfig
from pathlib import Path

from trainer.config import ConfigError
from trainer.config.schema import DataConfig
from trainer.errors import DataError, describe

_FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class StdlibDocuments:
    """Python's own standard library source: a few MB of real text that every Python install carries."""

    def __init__(self):
        root = Path(sysconfig.get_paths()["stdlib"])
        files = []
        for folder, subfolders, names in os.walk(root):
            # Installed packages live below the stdlib too: not walked at all (seconds on a big install).
            subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
            files.extend(Path(folder) / n for n in names if n.endswith(".py"))
        self.files = sorted(files)
        self.name = f"the Python standard library at {root}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return self.files[i].read_text(encoding="utf-8", errors="replace")


class DatasetDocuments:
    """One text field of a Hugging Face `datasets.Dataset` (map-style, memory-mapped Arrow); with
    field None, whole records (for supervised finetuning)."""

    def __init__(self, dataset, field: str | None, name: str):
        if field is not None and field not in dataset.column_names:
            raise DataError(
                f"{name}: no field '{field}' (its fields: {', '.join(dataset.column_names)}); set data.text_field"
            )
        self.dataset, self.field, self.name = dataset, field, name

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return self.dataset.column_names

    def __getitem__(self, i: int):
        if self.field is None:
            return self.dataset[i]
        value = self.dataset[i][self.field]
        if not isinstance(value, str):
            raise DataError(f"{self.name}: record {i} field '{self.field}' is {type(value).__name__}, not text")
        return value


def local_files(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in _FORMAT_BY_SUFFIX)
        if not files:
            raise DataError(f"data.source={source}: the directory holds no {'/'.join(_FORMAT_BY_SUFFIX)} files")
        return files
    if path.is_file():
        return [str(path)]
    matches = sorted(glob.glob(source, recursive=True))
    if not matches:
        raise DataError(
            f"data.source={source}: no such file, directory or glob match "
            f"(for a Hugging Face Hub dataset write hub:NAME)"
        )
    return matches


def format_of(files: list[str], configured: str) -> str:
    if configured != "auto":
        return configured
    formats = {_FORMAT_BY_SUFFIX.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise DataError(
            f"data.source: cannot pick one format for {files[:3]}{'...' if len(files) > 3 else ''}; "
            f"use files of one kind (.txt, .json/.jsonl, .parquet) or set data.format"
        )
    return formats.pop()


def read_documents(cfg: DataConfig) -> "StdlibDocuments | DatasetDocuments":
    """Texts or records to tokenize: the stdlib corpus, local files, or a Hub dataset (map-style)."""
    if cfg.source == "stdlib":
        if cfg.task == "sft":
            raise ConfigError("data.task=sft needs records (data.source: a .json/.jsonl/.parquet file or hub:NAME)")
        return StdlibDocuments()
    import datasets

    datasets.disable_progress_bars()
    # Our errors name the file and the row; datasets' own error log lines would only come first and
    # repeat them less clearly.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    if cfg.source.startswith("hub:"):
        name = cfg.source.removeprefix("hub:")
        offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if not offline and not hub_reachable():
            raise DataError(
                f"data.source={cfg.source}: the Hugging Face Hub cannot be reached from this machine. Download the "
                f"dataset where there is a network and point data.source at its files (or set HF_HUB_OFFLINE=1 to "
                f"use the local datasets cache)"
            )
        try:
            dataset = datasets.load_dataset(name, cfg.hub_config, split=cfg.split)
        except Exception as e:
            hint = "HF_HUB_OFFLINE is set" if offline else "is this machine offline?"
            raise DataError(
                f"data.source={cfg.source}: could not load it from the Hugging Face Hub ({hint}): "
                f"{' '.join(str(e).split())[:300]}. Download it first, or point data.source at local files"
            ) from None
        return DatasetDocuments(dataset, _field(cfg), f"hub dataset {name}")

    files = local_files(cfg.source)
    fmt = format_of(files, cfg.format)
    for file in files:
        check_file(Path(file), fmt)
    kwargs = {"sample_by": cfg.text_sample_by} if fmt == "text" else {}
    name = files[0] if len(files) == 1 else f"{cfg.source} ({len(files)} files)"
    try:
        dataset = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except Exception as e:
        if fmt == "json":
            for file in files:
                find_bad_json(Path(file))
        raise DataError(f"{name}: cannot read it as {fmt} ({describe(e)})") from None
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset is empty")
    return DatasetDocuments(dataset, _field(cfg), name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the Hub's endpoint: without it, datasets retries for half a minute offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


_SNIFF_BYTES = 1 << 16


def check_file(path: Path, fmt: str) -> None:
    """Cheap checks that name what is wrong with a file before datasets fails on it less clearly."""
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: the file is empty; remove it from data.source or give it some documents")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        if fmt == "parquet":
            f.seek(max(0, size - 4))
            tail = f.read(4)
    if fmt == "parquet":
        if head[:4] != b"PAR1" or tail != b"PAR1":
            raise DataError(f"{path}: not a Parquet file (it lacks Parquet's PAR1 signature); is the file damaged "
                            f"or misnamed? Set data.format if it holds another format")
        return
    nul = head.find(b"\x00")
    try:
        # An incremental decoder: a character cut at the end of the sniffed bytes is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head if nul < 0 else head[:nul], final=False)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (an invalid byte at offset {e.start}); is it a binary file? "
                        f"Data files must be UTF-8 ({fmt})") from None
    if nul >= 0:
        raise DataError(f"{path}: not text (a NUL byte at offset {nul}); is it a binary file? Data files must be UTF-8 ({fmt})")


def find_bad_json(path: Path) -> None:
    """After datasets failed on a JSON file: raises naming the first line that does not parse. Read only
    on failure, so the happy path never parses a large file twice."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return  # one valid JSON document: its problem is elsewhere
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("[") or "\n" not in text.strip():
            # One JSON document (an array of records): its own error position is the answer.
            raise DataError(f"{path}: not valid JSON at line {whole.lineno}, column {whole.colno} ({whole.msg})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); fix or remove "
                            f"that record") from None


def _field(cfg: DataConfig) -> str | None:
    return None if cfg.task == "sft" else cfg.text_field


def count_documents(docs) -> str:
    if getattr(docs, "mixture", False):
        return "; ".join(f"{c.name}: {count_documents(c.docs)}" for c in docs.components)
    return "a stream of documents" if getattr(docs, "streamed", False) else f"{len(docs):,} documents"


def check_num_streams(docs, num_streams: int, text_sample_by: str = "") -> None:
    if getattr(docs, "mixture", False):
        for c in docs.components:
            check_num_streams(c.docs, num_streams, c.cfg.text_sample_by)
        return
    if getattr(docs, "streamed", False):
        return  # its length is unknown: a stream that gets no documents says so at its first window
    if len(docs) < num_streams:
        text = text_sample_by == "document" and str(docs.name).endswith(".txt")
        split = ", or split the text into more documents: data.text_sample_by=paragraph (blank-line separated) or line" if text else ""
        raise ConfigError(
            f"{docs.name} has {len(docs)} documents, fewer than data.num_streams={num_streams}; "
            f"lower data.num_streams (it must stay a multiple of the data-parallel size){split}"
        )
