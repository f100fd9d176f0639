"""What the trainer needs of a tokenizer, whatever library backs it."""

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS/EOS added, special-token strings treated as text."""

    def decode(self, ids: list[int]) -> str: ...
