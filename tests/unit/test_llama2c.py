"""karpathy's real pretrained stories260K through our llama2.c importer: a real model's loss and text."""

import re

import pytest

from trainer.evaluate import per_token_loss
from trainer.generate import Sampling, generate
from models import build_meta_model
from trainer.tokenizer.spm import SentencePieceTokenizer
from trainer.weights.errors import CheckpointError
from trainer.weights.load import load_model, load_weights, read_checkpoint_args


def test_stories260k_loss_and_sample(shared):
    path = shared("models/stories260K/stories260K.bin")
    tok = SentencePieceTokenizer(shared("tokenizers/tok512/tok512.model"))
    model = load_model(path)
    a = model.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.hidden_dim) == (64, 5, 8, 4, 512, 172)
    assert sum(p.numel() for p in model.parameters()) == 260_032  # the count karpathy reports

    stories = shared("text/tinystories/tinystories_sample.txt").read_text().split("<|endoftext|>")
    sequences = [[tok.bos_id] + tok.encode(s.strip()) for s in stories if s.strip()]
    loss = per_token_loss(model, sequences)
    assert abs(loss - 1.30) < 0.1, loss  # karpathy's reported validation loss for this model: 1.297

    text = tok.decode(generate(model, [tok.bos_id], Sampling(max_new_tokens=120), stop_ids=(tok.bos_id,)))
    words = re.findall(r"[a-z']+", text.lower())
    # Fluent English: every word is one a real TinyStories text uses, and there are enough of them.
    known = set(re.findall(r"[a-z']+", shared("text/tinystories/tinystories_train_head.txt").read_text().lower()))
    assert len(words) >= 30, text
    assert sum(w in known for w in words) / len(words) >= 0.95, text


def test_truncated_llama2c_file(shared, tmp_path):
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes(shared("models/stories260K/stories260K.bin").read_bytes()[:50_000])
    model = build_meta_model(read_checkpoint_args(bad))
    model.to_empty(device="cpu")
    with pytest.raises(CheckpointError, match=r"stories260K.bin: 50000 bytes.*truncated"):
        load_weights(model, bad)
