"""One packed stream: documents -> [BOS] tokens [EOS] -> back-to-back windows of seq_len + 1 tokens.

A window is the input (first seq_len tokens) and the shifted labels (last seq_len) of one sequence,
with the offsets where its documents begin (document-aware attention keeps them apart). The stream's
position is a few integers plus the tokens and offsets of a half-filled window, so saving and restoring
it is exact and cheap.
"""

from dataclasses import asdict, dataclass, field

import torch

from trainer.data.documents import DataError


@dataclass
class StreamState:
    epoch: int = 0
    cursor: int = 0  # index into this stream's documents for `epoch`
    token_pos: int = 0  # tokens of the document at `cursor` already used
    partial: list[int] = field(default_factory=list)  # tokens of the window being filled
    # Offsets in `partial` where a document begins (a window's first tokens may finish an earlier one).
    starts: list[int] = field(default_factory=list)
    windows: int = 0  # windows produced so far (also the id of the next one)


class PackedStream:
    def __init__(self, docs, stream_id: int, num_streams: int, tokenize, window: int, seed: int, shuffle: bool):
        self.docs, self.stream_id, self.num_streams = docs, stream_id, num_streams
        self.tokenize, self.window, self.seed, self.shuffle = tokenize, window, seed, shuffle
        self.state = StreamState()
        self._order_epoch, self._order = -1, None
        # The document being cut into windows, tokenized once: a long one spans many windows.
        self._tokens_of: tuple[int, list[int]] = (-1, [])

    def _documents_of(self, epoch: int) -> list[int]:
        """This stream's document indices for an epoch: every num_streams-th of a (seeded) permutation."""
        if self._order_epoch != epoch:
            n = len(self.docs)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                order = torch.randperm(n, generator=generator).tolist()
            else:
                order = list(range(n))
            self._order, self._order_epoch = order[self.stream_id :: self.num_streams], epoch
        return self._order

    def _tokens(self, index: int) -> list[int]:
        if self._tokens_of[0] != index:
            self._tokens_of = (index, self.tokenize(index))
        return self._tokens_of[1]

    def next_window(self) -> tuple[list[int], list[int], tuple[int, int]]:
        """The next window of seq_len + 1 tokens, the offsets where its documents begin, and its id
        (stream, index within the stream)."""
        s = self.state
        empty_epochs = 0
        while len(s.partial) < self.window:
            order = self._documents_of(s.epoch)
            if s.cursor >= len(order):
                s.epoch, s.cursor, s.token_pos = s.epoch + 1, 0, 0
                empty_epochs += 1
                if empty_epochs > 1:  # a whole pass over this stream's documents gave no tokens
                    raise DataError(f"{self.docs.name}: every document of stream {self.stream_id} is empty")
                continue
            tokens = self._tokens(order[s.cursor])
            take = tokens[s.token_pos : s.token_pos + self.window - len(s.partial)]
            if s.token_pos == 0 and take:
                s.starts.append(len(s.partial))
            s.partial.extend(take)
            s.token_pos += len(take)
            if tokens:
                empty_epochs = 0
            if s.token_pos >= len(tokens):
                s.cursor, s.token_pos = s.cursor + 1, 0
        window, starts, s.partial, s.starts = s.partial, s.starts, [], []
        s.windows += 1
        return window, starts, (self.stream_id, s.windows - 1)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints from before document offsets were kept lack "starts": their half-filled window
        # then counts as one document.
        self.state = StreamState(**{**state, "partial": list(state["partial"]), "starts": list(state.get("starts", []))})
