"""Each tokenizer kind against its own library's encoding of the same real text."""

import pytest
import sentencepiece
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tokenizers import Tokenizer as HfRustTokenizer

from trainer.config import ConfigError
from trainer.config.schema import TokenizerConfig
from trainer.tokenizer import build_tokenizer


@pytest.fixture
def text(shared):
    return shared("text/tinyshakespeare/input.txt").read_text()[:20000] + " naïve café 東京 🙂\n\n  tabs\there"


def _build(kind, path):
    return build_tokenizer(TokenizerConfig(kind=kind, path=str(path) if path else None))


def test_byte_round_trip(text):
    tok = _build("auto", None)
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert max(ids) < tok.vocab_size and {tok.bos_id, tok.eos_id} == {256, 257}


@pytest.mark.parametrize("name", ["llama2/tokenizer.model", "tok512/tok512.model"])
def test_sentencepiece_matches_library(shared, text, name):
    path = shared(f"tokenizers/{name}")
    tok = _build("auto", path)
    oracle = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert tok.encode(text) == oracle.encode(text)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, oracle.get_piece_size())


def test_tok512_known_ids(shared):
    tok = _build("auto", shared("tokenizers/tok512/tok512.model"))
    assert tok.encode("Once upon a time") == [403, 407, 261, 378]


def test_llama3_tiktoken(shared, text):
    tok = _build("auto", shared("tokenizers/llama3/tokenizer.model"))
    assert tok.vocab_size == 128256 and tok.bos_id == 128000 and tok.eos_id == 128001
    assert tok.encode("Hello world") == [9906, 1917]  # Meta's reference ids (shared/data README)
    # Special tokens: <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|> after BOS.
    header = [tok.special[s] for s in ("<|start_header_id|>",)] + tok.encode("user")
    header += [tok.special["<|end_header_id|>"]] + tok.encode("\n\nHi!") + [tok.special["<|eot_id|>"]]
    assert [tok.bos_id] + header == [128000, 128006, 882, 128007, 271, 13347, 0, 128009]
    # Text that merely contains a special token's spelling is encoded as text, never as the special id.
    assert 128009 not in tok.encode("a <|eot_id|> b")
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_matches_tiktoken(shared, text):
    folder = shared("tokenizers/gpt2")
    tok = _build("auto", folder)
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    gpt2_pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    oracle = tiktoken.Encoding("gpt2-files", pat_str=gpt2_pattern, mergeable_ranks=ranks, special_tokens={})
    assert tok.encode(text) == oracle.encode(text)
    assert tok.encode("Hello world") == [15496, 995] and tok.eos_id == 50256


def test_hf_directory_with_chat_template(shared, text):
    folder = shared("tokenizers/phi3-mini")
    tok = _build("auto", folder)
    oracle = HfRustTokenizer.from_file(str(folder / "tokenizer.json"))
    plain = text[:5000]  # plain text (no special tokens) encodes the same in every transformers version
    assert tok.encode(plain) == oracle.encode(plain, add_special_tokens=False).ids
    assert tok.chat_template and "<|assistant|>" in tok.chat_template
    assert (tok.bos_id, tok.eos_id) == (1, 32000)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        _build("auto", tmp_path / "missing.model")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01")
    with pytest.raises(ConfigError, match="cannot tell its kind"):
        _build("auto", tmp_path / "junk.bin")
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ConfigError, match="cannot load it as a sentencepiece tokenizer"):
        _build("auto", tmp_path / "bad.model")
