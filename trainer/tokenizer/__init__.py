"""Builds the tokenizer named by the `tokenizer` config section; `auto` picks the kind from the path."""

from pathlib import Path

from trainer.config import ConfigError
from trainer.config.schema import TokenizerConfig
from trainer.tokenizer.base import Tokenizer
from trainer.tokenizer.bpe_ranks import is_bpe_ranks_file


def detect_kind(path: Path) -> str:
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return "hf"
        if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
            return "gpt2"
        if (path / "tokenizer.model").is_file():
            return detect_kind(path / "tokenizer.model")
    elif path.suffix == ".json":
        return "hf"
    elif path.suffix == ".model":
        return "tiktoken" if is_bpe_ranks_file(path) else "sentencepiece"
    raise ConfigError(
        f"tokenizer.path={path}: cannot tell its kind; set tokenizer.kind to one of hf, sentencepiece, tiktoken, gpt2"
    )


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    kind = cfg.kind
    if cfg.path is None:
        if kind not in ("auto", "byte"):
            raise ConfigError(f"tokenizer.kind={kind} needs tokenizer.path")
        kind = "byte"
    if kind == "byte":
        from trainer.tokenizer.byte_level import ByteTokenizer

        return ByteTokenizer()
    path = Path(cfg.path)
    if not path.exists():
        raise ConfigError(f"tokenizer.path: no such file or directory: {path}")
    if kind == "auto":
        kind = detect_kind(path)
    try:
        if kind == "hf":
            from trainer.tokenizer.hf_files import HfTokenizer

            return HfTokenizer(path)
        if kind == "gpt2":
            from trainer.tokenizer.gpt2_files import Gpt2Tokenizer

            folder = path if path.is_dir() else path.parent
            return Gpt2Tokenizer(folder / "encoder.json", folder / "vocab.bpe")
        file = path / "tokenizer.model" if path.is_dir() else path
        if kind == "tiktoken":
            from trainer.tokenizer.bpe_ranks import BpeRanksTokenizer

            return BpeRanksTokenizer(file)
        from trainer.tokenizer.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(file)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"tokenizer.path={path}: cannot load it as a {kind} tokenizer ({' '.join(str(e).split())})") from None
