"""Packing, rank sharding, state and bad-data errors of the data pipeline, on real files."""

import json
import time

import pytest
import torch

from trainer.config import ConfigError
from trainer.config.schema import DataConfig
from trainer.data import DataError, PackedLoader, check_enough_tokens, load_documents
from trainer.tokenizer.byte_level import ByteTokenizer

TOK = ByteTokenizer()


def _loader(docs, rank=0, world=1, batch=2, seq_len=64, **data):
    cfg = DataConfig(**{"num_streams": 4, **data})
    return PackedLoader(docs, TOK, cfg, seq_len=seq_len, local_batch_size=batch, dp_rank=rank, dp_size=world, seed=3)


def test_windows_are_the_documents_back_to_back(shared):
    docs = load_documents(DataConfig(source=str(shared("text/c4/c4_demo.jsonl"))))
    assert len(docs) == 300
    loader = _loader(docs, batch=4, shuffle=False, num_streams=1)
    inputs, labels, _ = loader.next_batch()
    assert inputs.shape == labels.shape == (4, 64)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are the inputs shifted by one
    stream = torch.cat([torch.cat([x[:1], y]) for x, y in zip(inputs, labels)]).tolist()
    expected = [TOK.bos_id] + TOK.encode(docs[0]) + [TOK.eos_id] + [TOK.bos_id] + TOK.encode(docs[1])
    assert stream == expected[: len(stream)]


def test_same_windows_on_one_two_and_four_ranks(shared):
    docs = load_documents(DataConfig(source=str(shared("text/tinystories/tinystories_train_head.txt")), text_sample_by="paragraph"))
    one = _loader(docs, batch=8)
    step_ids_one = []
    for _ in range(3):
        one.next_batch()
        step_ids_one.append(sorted(one.last_ids))
    for world in (2, 4):
        loaders = [_loader(docs, rank=r, world=world, batch=8 // world) for r in range(world)]
        for step in range(3):
            ids = []
            for loader in loaders:
                loader.next_batch()
                ids += loader.last_ids
            assert sorted(ids) == step_ids_one[step]
            assert len(set(ids)) == 8  # no window twice


def test_state_round_trip_continues_exactly(shared):
    docs = load_documents(DataConfig(source=str(shared("text/c4/c4_demo.jsonl"))))
    a = _loader(docs, seq_len=500)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives plain serialisation
    b = _loader(docs, seq_len=500)
    b.load_state_dict(state)
    for _ in range(20):  # long enough to cross document and epoch boundaries in some streams
        xa, _, _ = a.next_batch()
        xb, _, _ = b.next_batch()
        assert torch.equal(xa, xb) and a.last_ids == b.last_ids


def test_stdlib_corpus_is_there():
    docs = load_documents(DataConfig())
    assert len(docs) > 500 and "def " in docs[0] + docs[1] + docs[2]


def test_missing_file():
    with pytest.raises(DataError, match=r"data.source=/no/such.jsonl: no such file"):
        load_documents(DataConfig(source="/no/such.jsonl"))


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_documents(DataConfig(source=str(tmp_path / "empty.jsonl")))


def test_missing_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "hello"}\n' * 10)
    with pytest.raises(DataError, match=r"d.jsonl: no field 'text' \(its fields: content\); set data.text_field"):
        load_documents(DataConfig(source=str(tmp_path / "d.jsonl")))


def test_prefetching_gives_the_same_batches_and_positions(shared):
    """Batches made ahead on a thread: the same batches and window ids, a saved position that is the
    one of the batches taken (not of those made ahead), and a restore that continues exactly."""
    from trainer.data.prefetch import PrefetchingLoader

    docs = load_documents(DataConfig(source=str(shared("text/c4/c4_demo.jsonl"))))
    plain, ahead = _loader(docs, seq_len=500), PrefetchingLoader(_loader(docs, seq_len=500), depth=3)
    try:
        for _ in range(5):
            xa, _, _ = plain.next_batch()
            xb, _, _ = ahead.next_batch()
            assert torch.equal(xa, xb) and plain.last_ids == ahead.last_ids
        time.sleep(0.2)  # let the thread run ahead
        assert ahead.state_dict() == plain.state_dict()
        state = json.loads(json.dumps(plain.state_dict()))
        for _ in range(3):
            plain.next_batch()
            ahead.next_batch()
        ahead.load_state_dict(state)  # back to batch 5, with batches made ahead of batch 8 in the queue
        restored = _loader(docs, seq_len=500)
        restored.load_state_dict(state)
        for _ in range(20):
            xa, _, _ = restored.next_batch()
            xb, _, _ = ahead.next_batch()
            assert torch.equal(xa, xb) and restored.last_ids == ahead.last_ids
    finally:
        ahead.close()


def test_prefetching_raises_the_data_error_on_the_training_thread(tmp_path):
    from trainer.data.prefetch import PrefetchingLoader

    # 4 streams, in order: stream 3 holds documents 3 and 7, both empty.
    (tmp_path / "d.jsonl").write_text('{"text": "some words"}\n' * 3 + '{"text": "  "}\n' * 5)
    docs = load_documents(DataConfig(source=str(tmp_path / "d.jsonl")))
    ahead = PrefetchingLoader(_loader(docs, seq_len=8, shuffle=False), depth=2)
    with pytest.raises(DataError, match="every document of stream 3 is empty"):
        for _ in range(10):
            ahead.next_batch()
    ahead.close()


def test_every_document_too_short(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n' * 10)
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"))
    docs = load_documents(cfg)
    with pytest.raises(DataError, match=r"d.jsonl \(field 'text'\): every document is too short.*40 tokens"):
        check_enough_tokens(docs, TOK, cfg, seq_len=256)
    (tmp_path / "e.jsonl").write_text('{"text": "  "}\n' * 10)
    cfg = DataConfig(source=str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="every one of its 10 documents is empty"):
        check_enough_tokens(load_documents(cfg), TOK, cfg, seq_len=256)


def test_fewer_documents_than_streams(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello there"}\n' * 3)
    docs = load_documents(DataConfig(source=str(tmp_path / "d.jsonl")))
    with pytest.raises(ConfigError, match="has 3 documents, fewer than data.num_streams=4"):
        _loader(docs)


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match=r"hub:roneneldan/TinyStories: could not load it .*HF_HUB_OFFLINE is set"):
        load_documents(DataConfig(source="hub:roneneldan/TinyStories"))


def test_parquet_and_text_formats(tmp_path, shared):
    import datasets

    datasets.Dataset.from_dict({"body": ["first doc", "second doc"] * 5}).to_parquet(tmp_path / "d.parquet")
    docs = load_documents(DataConfig(source=str(tmp_path / "d.parquet"), text_field="body"))
    assert len(docs) == 10 and docs[1] == "second doc"
    stories = load_documents(DataConfig(source=str(shared("text/tinystories/tinystories_sample.txt")), text_sample_by="line"))
    lines = [stories[i] for i in range(len(stories)) if stories[i].strip()]
    assert len(lines) > 20 and lines[0].startswith("Once upon a time there was a little boy named Ben.")
