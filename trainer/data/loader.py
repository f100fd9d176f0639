"""Batches of packed windows for one data-parallel rank, the same data whatever the number of ranks.

Global window n (counted over all ranks, in step order) comes from stream n % num_streams and is fed to
data-parallel rank n % dp. Since dp divides num_streams, rank r reads only the streams s with
s % dp == r, and the windows of each step are the same set on 1, 2 or 4 ranks: a run can be compared
with, or resumed on, another number of ranks.
"""

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from trainer.config.schema import DataConfig
from trainer.data.documents import DataError, check_num_streams
from trainer.data.packing import IndexedCursor, PackedStream
from trainer.data.sft import SftTokenizer, check_records
from trainer.data.streaming import StreamCursor
from trainer.loss import IGNORE_INDEX


class Batch(NamedTuple):
    """One microbatch, each (local_batch_size, seq_len): the input tokens, their labels (IGNORE_INDEX where
    a token is not trained, an SFT prompt) and each token's document id within its window (documents
    packed into one window count from 0 or 1, in order; a window that starts inside a document gives that
    tail the first id)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    documents: torch.Tensor


def make_batch(packed: np.ndarray, begins: np.ndarray) -> Batch:
    """(rows, seq_len + 1) packed tokens (masked ones as -(id + 1)) and 1 where a document begins -> a Batch."""
    masked = packed < 0
    tokens = torch.from_numpy(packed)
    if masked.any():
        trained = torch.from_numpy(~masked)
        tokens = torch.where(trained, tokens, -tokens - 1)
        labels = torch.where(trained[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    else:  # pretraining: every token is trained (a batch's one pass over its tokens, not three)
        labels = tokens[:, 1:].clone()
    documents = torch.from_numpy(begins[:, :-1]).cumsum(dim=1)
    return Batch(tokens[:, :-1], labels, documents)


class DocumentTokenizer:
    """Document index -> [BOS] + tokens + [EOS]; documents of only whitespace give no tokens."""

    def __init__(self, docs, tokenizer, add_bos: bool, add_eos: bool):
        self.docs, self.tokenizer = docs, tokenizer
        self.prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        self.suffix = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []

    def __call__(self, index: int) -> list[int]:
        return self.encode(self.docs[index])

    def encode(self, text: str) -> list[int]:
        if not text.strip():
            return []
        return self.prefix + self.tokenizer.encode(text) + self.suffix


def make_tokenize(docs, tokenizer, cfg: DataConfig):
    """Document index -> packed entries (for a streamed source: (record, where) -> entries), for the
    configured task; prepared token ids are entries already."""
    if getattr(docs, "prepared", False):
        return docs.__getitem__  # tokenized by prepare, masks and all
    if cfg.task == "sft":
        sft = SftTokenizer(docs, tokenizer, cfg.sft_format, docs.name, cfg.skip_bad_records)
        return sft.encode if getattr(docs, "streamed", False) else sft
    plain = DocumentTokenizer(docs, tokenizer, cfg.add_bos, cfg.add_eos)
    if getattr(docs, "streamed", False):  # a streamed source's cursor hands over records, not indices
        return lambda record, index: plain.encode(docs.text_of(record, index))
    return plain


def make_cursor(docs, stream_id: int, tokenize, cfg: DataConfig, seed: int):
    """Stream stream_id's supply of documents (trainer/data/packing.py)."""
    if getattr(docs, "streamed", False):
        return StreamCursor(docs, stream_id, cfg.num_streams, tokenize, seed, cfg.shuffle)
    return IndexedCursor(docs, stream_id, cfg.num_streams, tokenize, seed, cfg.shuffle)


class PackedLoader:
    def __init__(
        self, docs, tokenizer, cfg: DataConfig, seq_len: int, local_batch_size: int, dp_rank: int, dp_size: int,
        seed: int,
    ):
        check_num_streams(docs, cfg.num_streams, cfg.text_sample_by)
        self.docs, self.seq_len, self.batch_size = docs, seq_len, local_batch_size
        self.dp_rank, self.dp_size, self.num_streams = dp_rank, dp_size, cfg.num_streams
        tokenize = make_tokenize(docs, tokenizer, cfg)
        self.streams = {
            s: PackedStream(make_cursor(docs, s, tokenize, cfg, seed), seq_len + 1, docs.name)
            for s in range(dp_rank, cfg.num_streams, dp_size)
        }
        self.next_global = dp_rank  # the global index of this rank's next window
        self.last_ids: list[tuple[int, int]] = []

    def next_batch(self) -> Batch:
        """The next microbatch of this rank (int64 tensors); ids of its windows in last_ids."""
        windows, self.last_ids = [], []
        begins = np.zeros((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, (window, starts, window_id) in enumerate(self._windows()):
            windows.append(window)
            begins[row, starts] = 1
            self.last_ids.append(window_id)
        return make_batch(np.stack(windows), begins)

    def _windows(self):
        """This rank's windows of the next microbatch: (tokens, document starts, id) each."""
        for _ in range(self.batch_size):
            yield self.streams[self.next_global % self.num_streams].next_window()
            self.next_global += self.dp_size

    def close(self) -> None:
        """Nothing to stop: it runs on the caller's thread (PrefetchingLoader has one to stop)."""

    def state_dict(self) -> dict:
        """This rank's streams, and the windows consumed by all ranks together (the same on every rank
        at a step boundary). Nothing here depends on the number of ranks: merged over the ranks, it
        restores the data position on any layout whose dp divides num_streams."""
        return {
            "windows_consumed": self.next_global - self.dp_rank,
            "streams": {str(s): st.state_dict() for s, st in self.streams.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Takes the state of all streams (or at least this rank's) and picks this rank's."""
        self.next_global = state["windows_consumed"] + self.dp_rank
        for s, stream in self.streams.items():
            if str(s) not in state["streams"]:
                raise ValueError(f"the saved data state lacks stream {s} (was data.num_streams changed?)")
            stream.load_state_dict(state["streams"][str(s)])


# A streamed source's start-up check reads at most this many records for one window's worth of tokens.
_STREAM_CHECK_RECORDS = 100_000


def check_enough_tokens(docs, tokenizer, cfg: DataConfig, seq_len: int) -> None:
    """Fails early if the data cannot fill even one window (reads only as far as it must)."""
    if getattr(docs, "mixture", False):
        for c in docs.components:
            check_enough_tokens(c.docs, tokenizer, c.cfg, seq_len)
        return
    tokenize = make_tokenize(docs, tokenizer, cfg)
    if getattr(docs, "streamed", False):  # no length and no indices: the first documents, as far as needed
        documents = (tokenize(record, i) for i, record in enumerate(docs.first_records(_STREAM_CHECK_RECORDS)))
        count = f"first {_STREAM_CHECK_RECORDS:,} (or all)"
    else:
        documents = (tokenize(i) for i in range(len(docs)))
        count = f"{len(docs)}"
    if cfg.task == "sft" and not getattr(docs, "prepared", False) and not getattr(docs, "streamed", False):
        skipped = check_records(tokenize)
        if skipped and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"data: skipping {len(skipped)} bad records of {docs.name} (data.skip_bad_records): indices "
                  f"{skipped[:20]}{' ...' if len(skipped) > 20 else ''}", flush=True)
    total, nonempty = 0, 0
    for tokens in documents:
        n = len(tokens)
        total += n
        nonempty += n > 0
        if total > seq_len:
            return
    field = f" (field '{cfg.text_field}')" if cfg.source != "stdlib" and cfg.task == "pretrain" else ""
    if nonempty == 0:
        raise DataError(f"{docs.name}{field}: every one of its {count} documents is empty")
    raise DataError(
        f"{docs.name}{field}: every document is too short: all {count} hold {total} tokens together, "
        f"fewer than one training window of training.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len"
    )
