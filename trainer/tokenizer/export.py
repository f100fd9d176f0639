"""The tokenizer's files beside an exported model, so that the export directory is usable on its own
(transformers' AutoTokenizer loads it where a Hugging Face tokenizer class reads that format)."""

import json
import shutil
from pathlib import Path

from trainer.config.schema import TokenizerConfig
from trainer.tokenizer import detect_kind
from trainer.tokenizer.gpt2_files import END_OF_TEXT
from trainer.weights.files import readable

# Files a Hugging Face tokenizer directory may hold; those present are copied.
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def export_tokenizer(cfg: TokenizerConfig, out_dir: Path) -> list[str]:
    """Copies the tokenizer into out_dir under the names transformers expects; returns the file names
    written (none for the byte tokenizer, which has no file)."""
    if cfg.path is None or cfg.kind == "byte":
        return []
    src = Path(cfg.path)
    kind = detect_kind(src) if cfg.kind == "auto" else cfg.kind
    out_dir = Path(out_dir)
    copies: dict[str, Path] = {}
    tokenizer_config = None
    if kind == "hf":
        if src.is_dir():
            copies = {name: src / name for name in _HF_FILES if (src / name).is_file()}
        else:
            copies = {"tokenizer.json": src}
    elif kind == "gpt2":
        folder = src if src.is_dir() else src.parent
        # The same two files under the names transformers' GPT-2 tokenizer reads; its one special token
        # ends documents and is not put in front of them (as our GPT-2 tokenizer does).
        copies = {"vocab.json": folder / "encoder.json", "merges.txt": folder / "vocab.bpe"}
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT,
                            "unk_token": END_OF_TEXT, "add_bos_token": False, "add_eos_token": False}
    else:
        model = src / "tokenizer.model" if src.is_dir() else src
        copies = {"tokenizer.model": model}
        # A SentencePiece model is what Llama 1/2's tokenizer reads; tiktoken ranks (Llama 3's original
        # format) have no transformers class that reads them as they are, so they travel without one.
        tokenizer_config = _sentencepiece_config(model) if kind == "sentencepiece" else None
    for name, path in copies.items():
        shutil.copyfile(path, out_dir / name)
        readable(out_dir / name)
    written = list(copies)
    if tokenizer_config and not (out_dir / "tokenizer_config.json").exists():
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        written.append("tokenizer_config.json")
    return sorted(written)


def _sentencepiece_config(model: Path) -> dict:
    """Llama's tokenizer with the model's own special pieces, adding BOS in front as training did
    (trainer/data puts it before every document): without these transformers adds none."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if i >= 0 else None

    return {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
            "unk_token": piece(sp.unk_id()), "add_bos_token": sp.bos_id() >= 0, "add_eos_token": False}
