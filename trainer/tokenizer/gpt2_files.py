"""OpenAI GPT-2 style byte-level BPE from encoder.json (vocab) + vocab.bpe (merges)."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

END_OF_TEXT = "<|endoftext|>"


class Gpt2Tokenizer:
    def __init__(self, vocab_file: Path, merges_file: Path):
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
        self.tokenizer = Tokenizer(bpe)
        self.tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.tokenizer.decoder = decoders.ByteLevel()
        self.vocab_size = self.tokenizer.get_vocab_size()
        eot = self.tokenizer.token_to_id(END_OF_TEXT)
        # GPT-2 has one special token, which marks both document ends and starts.
        self.bos_id, self.eos_id, self.pad_id = None, eot, None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
