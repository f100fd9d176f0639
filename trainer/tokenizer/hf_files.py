"""Hugging Face tokenizers: a tokenizer directory (with its chat template) or a lone tokenizer.json."""

from pathlib import Path


class HfTokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if path.is_dir():
            # Local files only, and never code from the directory (trust_remote_code stays off).
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        self.vocab_size = len(self.tokenizer)
        self.bos_id = self.tokenizer.bos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.chat_template = getattr(self.tokenizer, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
