"""One packed stream: documents -> [BOS] tokens [EOS] -> back-to-back windows of seq_len + 1 tokens.

A window is the input (first seq_len tokens) and the shifted labels (last seq_len) of one sequence,
with the offsets where its documents begin (document-aware attention keeps them apart). The stream's
position is a few integers (and, for a streamed source, the reader's own position) plus the tokens and
offsets of a half-filled window, so saving and restoring it is exact and cheap.

Where documents come from is a cursor: IndexedCursor walks a seeded permutation of an indexable source
(texts, records, prepared token ids); a streamed source has its own (trainer/data/streaming.py).
Tokens move as numpy int64 arrays (slices of memory-mapped shards need no copy until the window is
assembled): a window costs a few Python operations per document in it, not per token.
"""

import numpy as np
import torch

from trainer.errors import DataError

_NO_TOKENS = np.zeros(0, dtype=np.int64)


def document_order(num_docs: int, stream_id: int, num_streams: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """A stream's document indices for an epoch: every num_streams-th of a (seeded) permutation."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(num_docs, generator=generator).numpy()
    else:
        order = np.arange(num_docs)
    return order[stream_id::num_streams]


class IndexedCursor:
    """Stream stream_id's documents of an indexable source, epoch after epoch; its position is (epoch, cursor)."""

    def __init__(self, docs, stream_id: int, num_streams: int, tokenize, seed: int, shuffle: bool):
        self.docs, self.stream_id, self.num_streams = docs, stream_id, num_streams
        self.tokenize, self.seed, self.shuffle = tokenize, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, None
        # The document being cut into windows, tokenized once: a long one spans many windows.
        self._tokens_of: tuple[int, np.ndarray] = (-1, _NO_TOKENS)

    def tokens(self) -> np.ndarray | None:
        """The current document's tokens; None past the epoch's last document."""
        if self._order_epoch != self.epoch:
            self._order = document_order(len(self.docs), self.stream_id, self.num_streams, self.seed, self.epoch, self.shuffle)
            self._order_epoch = self.epoch
        if self.cursor >= len(self._order):
            return None
        index = int(self._order[self.cursor])
        if self._tokens_of[0] != index:
            tokens = self.tokenize(index)  # prepared shards give arrays (uint16/32 views), tokenizers lists
            self._tokens_of = (index, tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64))
        return self._tokens_of[1]

    def next_document(self) -> None:
        self.cursor += 1

    def next_epoch(self) -> None:
        self.epoch, self.cursor = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if "position" in state:
            raise DataError("the saved data position is of a streamed source (data.streaming=true), and this run's "
                            "source is indexed: resume with the data settings the run was started with")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class PackedStream:
    def __init__(self, cursor, window: int, name: str):
        self.documents, self.window, self.name = cursor, window, name
        self.token_pos = 0  # tokens of the current document already used
        self.windows = 0  # windows produced so far (also the id of the next one)
        self._pieces: list[np.ndarray] = []  # the half-filled window, as the slices it is made of
        self._filled = 0
        # Offsets in the half-filled window where a document begins (its first tokens may finish an earlier one).
        self._starts: list[int] = []

    def next_window(self) -> tuple[np.ndarray, list[int], tuple[int, int]]:
        """The next window of seq_len + 1 tokens (int64; masked tokens as -(id + 1)), the offsets where
        its documents begin, and its id (stream, index within the stream)."""
        docs, pieces, starts, window = self.documents, self._pieces, self._starts, self.window
        filled, token_pos = self._filled, self.token_pos
        empty_epochs = 0
        while filled < window:
            tokens = docs.tokens()
            if tokens is None:
                docs.next_epoch()
                token_pos = 0
                empty_epochs += 1
                if empty_epochs > 1:  # a whole pass over this stream's documents gave no tokens
                    raise DataError(f"{self.name}: every document of stream {docs.stream_id} is empty")
                continue
            take = tokens[token_pos : token_pos + window - filled]
            if len(take):
                if token_pos == 0:
                    starts.append(filled)
                pieces.append(take)
                filled += len(take)
                empty_epochs = 0
            token_pos += len(take)
            if token_pos >= len(tokens):
                docs.next_document()
                token_pos = 0
        self.token_pos = token_pos
        out = np.concatenate(pieces).astype(np.int64, copy=False) if len(pieces) > 1 else \
            pieces[0].astype(np.int64)  # a copy: never a view of a mapped file
        self._starts, self._pieces, self._filled = [], [], 0
        self.windows += 1
        return out, starts, (docs.stream_id, self.windows - 1)

    def state_dict(self) -> dict:
        partial = np.concatenate(self._pieces).astype(np.int64).tolist() if self._pieces else []
        return {**self.documents.state_dict(), "token_pos": self.token_pos, "partial": partial,
                "starts": list(self._starts), "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        self.documents.load_state_dict(state)
        self.token_pos, self.windows = int(state["token_pos"]), int(state["windows"])
        partial = np.asarray(state["partial"], dtype=np.int64)
        self._pieces, self._filled = ([partial] if len(partial) else []), len(partial)
        # Checkpoints from before document offsets were kept lack "starts": their half-filled window
        # then counts as one document.
        self._starts = list(state.get("starts", []))
