"""Document sources: an indexable list of texts, from the stdlib corpus, local files, or the Hub.

Every source is a `Documents`: len() and [i] -> str, with a `name` for error messages. Nothing is
tokenized here; that happens lazily in the packed streams.
"""

import glob
import os
import sysconfig
from pathlib import Path

from trainer.config import ConfigError
from trainer.config.schema import DataConfig

_FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Training data that is missing, empty or malformed."""


class StdlibDocuments:
    """Python's own standard library source: a few MB of real text that every Python install carries."""

    def __init__(self):
        root = Path(sysconfig.get_paths()["stdlib"])
        self.files = sorted(
            p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
        )
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


def _local_files(source: str) -> list[str]:
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


def _format_of(files: list[str], configured: str) -> str:
    if configured != "auto":
        return configured
    formats = {_FORMAT_BY_SUFFIX.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise DataError(
            f"data.source: cannot pick one format for {files[:3]}{'...' if len(files) > 3 else ''}; "
            f"use files of one kind (.txt, .json/.jsonl, .parquet) or set data.format"
        )
    return formats.pop()


def load_documents(cfg: DataConfig) -> "StdlibDocuments | DatasetDocuments":
    if cfg.source == "stdlib":
        if cfg.task == "sft":
            raise ConfigError("data.task=sft needs records (data.source: a .json/.jsonl/.parquet file or hub:NAME)")
        return StdlibDocuments()
    import datasets

    datasets.disable_progress_bars()
    if cfg.source.startswith("hub:"):
        name = cfg.source.removeprefix("hub:")
        offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        try:
            dataset = datasets.load_dataset(name, cfg.hub_config, split=cfg.split)
        except Exception as e:
            hint = "HF_HUB_OFFLINE is set" if offline else "is this machine offline?"
            raise DataError(
                f"data.source={cfg.source}: could not load it from the Hugging Face Hub ({hint}): "
                f"{' '.join(str(e).split())[:300]}. Download it first, or point data.source at local files"
            ) from None
        return DatasetDocuments(dataset, _field(cfg), f"hub dataset {name}")

    files = _local_files(cfg.source)
    fmt = _format_of(files, cfg.format)
    kwargs = {"sample_by": cfg.text_sample_by} if fmt == "text" else {}
    name = files[0] if len(files) == 1 else f"{cfg.source} ({len(files)} files)"
    try:
        dataset = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except Exception as e:
        raise DataError(f"{name}: cannot read it as {fmt} ({' '.join(str(e).split())[:300]})") from None
    if len(dataset) == 0:
        raise DataError(f"{name}: the dataset is empty")
    return DatasetDocuments(dataset, _field(cfg), name)


def _field(cfg: DataConfig) -> str | None:
    return None if cfg.task == "sft" else cfg.text_field


def check_num_streams(docs, num_streams: int) -> None:
    if len(docs) < num_streams:
        raise ConfigError(
            f"{docs.name} has {len(docs)} documents, fewer than data.num_streams={num_streams}; "
            f"lower data.num_streams (it must stay a multiple of the data-parallel size)"
        )
