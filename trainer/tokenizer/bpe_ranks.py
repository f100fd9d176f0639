"""tiktoken BPE rank files: the Llama 3 tokenizer.model, with Meta's split pattern and special tokens."""

from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

# Meta's split pattern for Llama 3 (llama-models, models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NUM_SPECIAL = 256


def llama3_special_tokens(num_base: int) -> dict[str, int]:
    """The Llama 3.1+ layout of the 256 special tokens that follow the base ranks."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
        "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(_NUM_SPECIAL - len(named))]
    return {token: num_base + i for i, token in enumerate(named + reserved)}


def is_bpe_ranks_file(path: Path) -> bool:
    """tiktoken files are text lines of `base64 rank`; SentencePiece models are binary protobuf."""
    try:
        with open(path, "rb") as f:
            first = f.readline(200).split()
        return len(first) == 2 and first[1].isdigit()
    except OSError:
        return False


class BpeRanksTokenizer:
    def __init__(self, path: Path):
        ranks = load_tiktoken_bpe(str(path))
        self.special = llama3_special_tokens(len(ranks))
        self.encoding = tiktoken.Encoding(
            name=Path(path).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)
