"""data.streaming=true: local files or a hub:NAME dataset read as a stream, never loaded or downloaded whole.

The reader is the datasets library's IterableDataset (the same library that reads the map-style sources, so
formats, fields and Hub access behave alike, and its readers carry a resumable position: state_dict()).
Packed stream s reads the source's documents that `split_dataset_by_node(rank=s, world_size=num_streams)`
gives it: whole files when their number is a multiple of num_streams, else every num_streams-th document
(each stream then reads past the others' documents: make a source of N x num_streams files to avoid that).
The split depends on num_streams only, so 1, 2 or 4 data-parallel ranks read the same windows.

A stream's position is its epoch, the documents it has taken, and the reader's state before the document
being cut into windows; a restore reopens the reader there (datasets skips to it: for text and JSON files it
re-reads the current file up to that point) and cuts the same document again at the same token. Order: a
streamed source is read in its own order (shuffle a corpus when you make it, as pretraining corpora are);
with data.shuffle, a source of several local files reads them in a seeded order that changes every epoch.
"""

import os
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.config.schema import DataConfig
from trainer.data.documents import check_file, format_of, hub_reachable, local_files
from trainer.errors import DataError, describe


_CHUNK_BYTES = 1 << 20


class StreamedSource:
    """A source to stream: opens a reader per stream and epoch; `name` for messages."""

    prepared, streamed = False, True

    def __init__(self, cfg: DataConfig):
        if cfg.source == "stdlib":
            raise ConfigError("data.streaming=true reads files or hub:NAME datasets; the stdlib source is small and "
                              "indexed: set data.streaming=false, or point data.source at your files")
        self.cfg, self.hub = cfg, cfg.source.startswith("hub:")
        if self.hub:
            offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            if not offline and not hub_reachable():
                raise DataError(f"data.source={cfg.source}: the Hugging Face Hub cannot be reached from this machine "
                                f"(streaming reads it during training); point data.source at local files")
            self.name = f"hub dataset {cfg.source.removeprefix('hub:')} (streamed)"
        else:
            self.files = local_files(cfg.source)
            self.format = format_of(self.files, cfg.format)
            for file in self.files:
                check_file(Path(file), self.format)
            self.name = (self.files[0] if len(self.files) == 1 else f"{cfg.source} ({len(self.files)} files)") + " (streamed)"
        first = next(iter(self.open(0, seed=0, shuffle=False)), None)
        if first is None:
            raise DataError(f"{self.name}: the dataset is empty")
        self.column_names = list(first)
        if cfg.task == "pretrain" and cfg.text_field not in first:
            raise DataError(f"{self.name}: no field '{cfg.text_field}' (its fields: {', '.join(first)}); set data.text_field")

    def open(self, epoch: int, seed: int, shuffle: bool):
        """The whole source as an IterableDataset, its files in this epoch's order."""
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        cfg = self.cfg
        try:
            if self.hub:
                return datasets.load_dataset(cfg.source.removeprefix("hub:"), cfg.hub_config, split=cfg.split, streaming=True)
            files = self.files
            if shuffle and len(files) > 1:
                order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
                files = [files[i] for i in order]
            kwargs = {"sample_by": cfg.text_sample_by} if self.format == "text" else {}
            if self.format in ("text", "json"):
                # Each packed stream holds a reader, and each reader a chunk of its file: 1 MB chunks, not
                # datasets' 10 MB, keep 8 streams' readers in tens of MB.
                kwargs["chunksize"] = _CHUNK_BYTES
            return datasets.load_dataset(self.format, data_files=files, split="train", streaming=True, **kwargs)
        except Exception as e:
            raise DataError(f"{self.name}: cannot stream it ({describe(e)})") from None

    def text_of(self, record: dict, index) -> str:
        value = record.get(self.cfg.text_field)
        if not isinstance(value, str):
            raise DataError(f"{self.name}: record {index} field '{self.cfg.text_field}' is {type(value).__name__}, not text")
        return value

    def first_records(self, limit: int):
        """The source's first records (start-up checks read only as far as they must)."""
        return islice(iter(self.open(0, seed=0, shuffle=False)), limit)


class StreamCursor:
    """Packed stream stream_id's documents of a StreamedSource; the PackedStream cursor interface."""

    def __init__(self, source: StreamedSource, stream_id: int, num_streams: int, encode, seed: int, shuffle: bool):
        self.source, self.stream_id, self.num_streams = source, stream_id, num_streams
        self.encode, self.seed, self.shuffle = encode, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self.position = None  # the reader's state before the current document (None: the epoch's start)
        self._reader = self._records = self._current = None

    def _open(self) -> None:
        from datasets.distributed import split_dataset_by_node

        whole = self.source.open(self.epoch, self.seed, self.shuffle)
        self._reader = split_dataset_by_node(whole, rank=self.stream_id, world_size=self.num_streams)
        if self.position is not None:
            self._reader.load_state_dict(self.position)
        self._records = iter(self._reader)

    def tokens(self) -> np.ndarray | None:
        if self._current is None:
            if self._records is None:
                self._open()
            self.position = self._reader.state_dict()
            record = next(self._records, None)
            if record is None:
                return None
            where = f"{self.cursor} of stream {self.stream_id}"  # errors name the record by its place in the stream
            self._current = np.asarray(self.encode(record, where), dtype=np.int64)
        return self._current

    def next_document(self) -> None:
        self.cursor, self._current = self.cursor + 1, None
        self.position = self._reader.state_dict()  # past the finished document: a save here resumes after it

    def next_epoch(self) -> None:
        self.epoch, self.cursor, self.position = self.epoch + 1, 0, None
        self._reader = self._records = self._current = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state:
            raise DataError("the saved data position is of an indexed source, and data.streaming=true now: resume with "
                            "the data settings the run was started with")
        self.epoch, self.cursor, self.position = int(state["epoch"]), int(state["cursor"]), state["position"]
        self._reader = self._records = self._current = None
