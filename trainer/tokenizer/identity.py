"""A tokenizer's fingerprint: what prepared token shards record of the tokenizer that made them.

Tokenizers come from four libraries and files in several formats, so the fingerprint is of behaviour, not
of files: the vocabulary size, the special ids, and the ids of a probe text that exercises what tokenizers
differ on (words, code, digits, whitespace runs, non-Latin scripts, emoji, special-token strings as text).
Two tokenizers that agree on all of it but split some other text differently would pass: the probe makes
that unlikely for real vocabularies, and the manifest also records the tokenizer's name for the message.
"""

import hashlib
import json

PROBE = (
    "The quick brown fox jumps over the lazy dog. It's 2026-12-05; 3.14159 x 42 = 131.95.\n"
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 4 spaces, then a tab:\t.\n"
    "   leading spaces, trailing spaces   \n\n\nnewlines. URLs: https://example.org/a?b=c&d=e#f\n"
    "Ünïcödé, naïve café; Здравствуйте, мир; こんにちは世界; 你好，世界; مرحبا بالعالم; नमस्ते\n"
    "Emoji 🙂🚀 and symbols ∑∫√∞ ≠ ≤ ≥ ← → «quotes» “curly” ‘single’ — dashes –\n"
    "<s> </s> <|endoftext|> <|begin_of_text|> <|im_start|>user [INST] special strings as plain text\n"
    "ALLCAPS camelCaseWords snake_case_words 0000000 1234567890 ____ ---- ****"
)


def fingerprint(tokenizer) -> str:
    facts = {
        "vocab_size": tokenizer.vocab_size, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
        "probe": tokenizer.encode(PROBE),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def describe(cfg) -> str:
    """The `tokenizer` config section in words (for messages and manifests)."""
    if cfg.path is None:
        return "the byte tokenizer"
    return f"{cfg.path}" + (f" ({cfg.kind})" if cfg.kind != "auto" else "")
