"""Held-out documents for validation: chosen by index alone, never in a training batch, and the only
documents in the validation batches. Each synthetic document repeats its own id, so a window's text
says which documents it came from."""

import json
import re

import pytest

from trainer.config import load_config
from trainer.data import DataError, PackedLoader, load_documents
from trainer.data.held_out import split_documents, training_and_eval_documents
from trainer.tokenizer.byte_level import ByteTokenizer
from trainer.validation import Validation

TOK = ByteTokenizer()
ID = re.compile(r"doc (\d{4})\.")


def _config(tmp_path, n_docs=300, **overrides):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"doc {i:04d}. " * (3 + i % 7)}) + "\n")
    settings = {"data.source": str(path), "data.num_streams": 4, "training.seq_len": 64,
                "training.local_batch_size": 4, "training.global_batch_size": -1,
                "eval.steps": 3, **overrides}
    return load_config("configs/debug.yaml", [f"{k}={v}" for k, v in settings.items()])


def _ids(inputs) -> set[int]:
    return {int(m) for row in inputs.tolist() for m in ID.findall(TOK.decode(row))}


def test_held_out_documents_never_reach_a_training_batch(tmp_path):
    cfg = _config(tmp_path, **{"eval.every": 5, "eval.split_fraction": 0.1})
    train, held = training_and_eval_documents(cfg.data, cfg.eval, load_documents)
    held_ids = {int(ID.search(held[i]).group(1)) for i in range(len(held))}
    assert 15 <= len(held_ids) <= 45 and len(train) + len(held) == 300  # about a tenth
    for world in (1, 2):  # the same documents are held out on any number of ranks
        seen = set()
        for rank in range(world):
            loader = PackedLoader(train, TOK, cfg.data, 64, 4, dp_rank=rank, dp_size=world, seed=cfg.job.seed)
            for _ in range(80 // world):  # more than an epoch: 80 x 4 windows of 65 bytes > 300 docs x ~65 bytes
                inputs, _, _ = loader.next_batch()
                seen |= _ids(inputs)
        assert not seen & held_ids
        assert seen == set(range(300)) - held_ids  # and every other document is trained on

    loader = PackedLoader(held, TOK, cfg.data, 64, 4, dp_rank=0, dp_size=1, seed=cfg.job.seed)
    validation = Validation(cfg.eval, {"": loader}, TOK, total_steps=cfg.training.steps)
    assert len(validation.main_batches) == 3
    validated = set().union(*(_ids(inputs) for inputs, _, _ in validation.main_batches))
    assert validated and validated <= held_ids


def test_the_held_out_choice_depends_on_the_index_only(tmp_path):
    docs = load_documents(_config(tmp_path).data)
    _, held = split_documents(docs, 0.2)
    _, again = split_documents(docs, 0.2)
    _, more = split_documents(docs, 0.4)
    assert held.indices == again.indices and set(held.indices) < set(more.indices)


def test_too_small_a_fraction_is_a_clear_error(tmp_path):
    docs = load_documents(_config(tmp_path, n_docs=5).data)
    with pytest.raises(DataError, match=r"eval.split_fraction=0.001 holds out none of the 5 documents"):
        split_documents(docs, 0.001)
