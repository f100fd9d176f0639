"""SentencePiece .model files (Llama 2, tok512)."""

from pathlib import Path

import sentencepiece


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.processor.get_piece_size()

        def special(i: int) -> int | None:
            return i if i >= 0 else None

        self.bos_id = special(self.processor.bos_id())
        self.eos_id = special(self.processor.eos_id())
        self.pad_id = special(self.processor.pad_id())

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)
