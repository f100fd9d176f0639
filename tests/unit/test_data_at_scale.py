"""Data at scale: prepared token shards, streamed sources and weighted mixtures, each against the plain
loader over the same text (the oracle: what training from the raw text packs), on 1 and 2 ranks, with
their positions saved and restored through JSON as a checkpoint stores them."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config.schema import DataConfig, DataSourceConfig, TokenizerConfig
from trainer.data import DataError, check_enough_tokens, load_documents, make_loader
from trainer.data.mixture import MixtureLoader
from trainer.data.prepare import prepare
from trainer.data.shards import MANIFEST
from trainer.tokenizer import build_tokenizer
from trainer.tokenizer.byte_level import ByteTokenizer

TOK = ByteTokenizer()
C4 = "text/c4/c4_demo.jsonl"
ALPACA = "instruct/alpaca/alpaca_data_first2000.json"


def _loader(docs, cfg, rank=0, world=1, batch=4, seq_len=128):
    return make_loader(docs, TOK if cfg.task == "pretrain" else _tok512(), cfg, seq_len, batch, rank, world, seed=5)


_TOK512 = []


def _tok512():
    from tests.conftest import SHARED_DATA

    if not _TOK512:
        _TOK512.append(build_tokenizer(TokenizerConfig(path=str(SHARED_DATA / "tokenizers/tok512/tok512.model"))))
    return _TOK512[0]


def _batches(loader, steps):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(steps)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """c4 (pretrain, byte tokenizer) and Alpaca (SFT, tok512: prompts masked) prepared once, by 2 worker
    processes and in the test's own."""
    from tests.conftest import _shared

    root = tmp_path_factory.mktemp("prepared")
    c4, alpaca = _shared(C4), _shared(ALPACA)
    prepare(None, [f"data.source={c4}", "tokenizer.kind=byte"], root / "c4", num_proc=2, docs_per_shard=70, dtype=None)
    prepare(None, [f"data.source={alpaca}", "data.task=sft", "data.skip_bad_records=true", f"tokenizer.path={_shared('tokenizers/tok512/tok512.model')}"],
            root / "alpaca", num_proc=1, docs_per_shard=None, dtype="uint32")
    return {"c4": (c4, root / "c4"), "alpaca": (alpaca, root / "alpaca")}


@pytest.mark.parametrize("name", ["c4", "alpaca"])
def test_prepared_shards_pack_the_raw_texts_batches_on_one_and_two_ranks(prepared, name):
    raw_path, shards = prepared[name]
    task = "sft" if name == "alpaca" else "pretrain"
    raw_cfg = DataConfig(source=str(raw_path), task=task, num_streams=4, skip_bad_records=True)
    raw, ours = load_documents(raw_cfg), load_documents(dataclasses.replace(raw_cfg, source=str(shards)))
    assert len(ours) == len(raw)
    steps = 30  # past the first epoch of some streams at seq_len 128 x 4 rows
    for world in (1, 2):
        for rank in range(world):
            want = _batches(_loader(raw, raw_cfg, rank, world, batch=4 // world), steps)
            got = _batches(_loader(ours, raw_cfg, rank, world, batch=4 // world), steps)
            assert _same(want, got), (name, world, rank)
    if task == "sft":  # the prompts stay masked: some labels are ignored, as from the records
        assert any((b[1] == -100).any() for b in got)


def test_the_manifest_records_what_made_the_tokens(prepared):
    manifest = json.loads((prepared["c4"][1] / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and manifest["documents"] == 300 and len(manifest["shards"]) == 5
    raw = load_documents(DataConfig(source=str(prepared["c4"][0])))
    assert manifest["tokens"] == sum(len(TOK.encode(raw[i])) + 2 for i in range(len(raw)))
    assert manifest["tokenizer"]["name"] == "the byte tokenizer"
    sft = json.loads((prepared["alpaca"][1] / MANIFEST).read_text())
    assert sft["dtype"] == "uint32" and sft["settings"]["sft_format"] == "alpaca"
    assert all("trained" in s["files"] for s in sft["shards"])


def test_damaged_shards_and_edited_manifests_are_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "c4"
    shutil.copytree(prepared["c4"][1], copy)
    tokens = copy / "shard-00002.tokens"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 1
    tokens.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00002.tokens does not match its checksum"):
        load_documents(DataConfig(source=str(copy)))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tokens"] += 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"prepared.json: the manifest does not match its checksum"):
        load_documents(DataConfig(source=str(copy)))


def test_an_interrupted_prepare_finishes_only_what_it_lacks(shared, tmp_path):
    """kill -9 mid-way, then the same command: it reports the shards it had, and the result is the same
    manifest (every checksum) as an uninterrupted prepare's."""
    source = shared("text/tinyshakespeare/input.txt")
    command = [sys.executable, "-m", "trainer.data.prepare", "--output", str(tmp_path / "out"), "--num-proc", "1",
               "--docs-per-shard", "4000", f"data.source={source}", "data.text_sample_by=line", "tokenizer.kind=byte"]
    # The uninterrupted reference, beside it.
    whole = subprocess.Popen([*command[:4], str(tmp_path / "whole"), *command[5:]], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    slow = {**os.environ, "TESSERA_DEBUG_PREPARE_DELAY": "1"}  # seconds a shard: time to interrupt it
    process = subprocess.Popen(command, env=slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list((tmp_path / "out").glob("*.done")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the prepare and its worker processes, as a kill -9 of the job would
    process.wait()
    done = len(list((tmp_path / "out").glob("*.done")))
    assert 1 <= done and not (tmp_path / "out" / MANIFEST).exists()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} of" in again.stdout
    assert whole.wait(timeout=120) == 0, whole.stderr.read()
    first, second = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("out", "whole"))
    assert first == second and len(first["shards"]) > done
    assert not list((tmp_path / "out").glob("*.done")) and not list((tmp_path / "out").glob("*.tmp"))


def test_a_stream_packs_what_the_indexed_source_packs_and_resumes_exactly(shared, tmp_path):
    """Streamed in order, a source's windows are those of the same source indexed without shuffling (each
    stream takes every num_streams-th document either way); a position saved mid-document and mid-epoch
    continues exactly, into the next epoch, on 1 and 2 ranks."""
    path = str(tmp_path / "c4-first-42.jsonl")  # about 100 K bytes: 60 batches are two epochs
    Path(path).write_text("".join(shared(C4).read_text().splitlines(keepends=True)[:42]))
    indexed_cfg = DataConfig(source=path, num_streams=4, shuffle=False)
    stream_cfg = dataclasses.replace(indexed_cfg, streaming=True)
    indexed, streamed = load_documents(indexed_cfg), load_documents(stream_cfg)
    assert getattr(streamed, "streamed", False)
    for world in (1, 2):
        for rank in range(world):
            a = _loader(indexed, indexed_cfg, rank, world, batch=4 // world, seq_len=500)
            b = _loader(streamed, stream_cfg, rank, world, batch=4 // world, seq_len=500)
            assert _same(_batches(a, 12), _batches(b, 12))
            state = json.loads(json.dumps(b.state_dict()))
            c = _loader(streamed, stream_cfg, rank, world, batch=4 // world, seq_len=500)
            c.load_state_dict(state)
            after = _batches(a, 60)
            assert _same(after, _batches(b, 60)) and _same(after, _batches(c, 60))
            assert max(s["epoch"] for s in c.state_dict()["streams"].values()) >= 1


def _mixture_cfg(shared, prepared_c4, **more):
    return DataConfig(num_streams=4, sources=[
        DataSourceConfig(source=str(shared("text/tinyshakespeare/input.txt")), weight=0.6, text_sample_by="paragraph"),
        DataSourceConfig(source=str(prepared_c4), weight=0.3, name="c4"),
        DataSourceConfig(source=str(shared("text/tinystories/tinystories_train_head.txt")), weight=0.1, name="stories",
                         text_sample_by="paragraph", streaming=True),
    ], **more)


def test_a_mixture_holds_its_weights_within_1_percent_on_one_and_two_ranks(shared, prepared):
    """1,000 windows of a 0.6 / 0.3 / 0.1 mixture (a plain file, prepared shards, a stream), counted from
    the windows themselves: shares within 1% of the weights, the same windows on 1 and 2 ranks."""
    cfg = _mixture_cfg(shared, prepared["c4"][1])
    mixture = load_documents(cfg)
    check_enough_tokens(mixture, TOK, cfg, 32)
    seen = {}
    for world in (1, 2):
        loaders = [_loader(mixture, cfg, r, world, batch=8 // world, seq_len=32) for r in range(world)]
        ids = []
        for _ in range(125):  # 125 steps x 8 windows
            for loader in loaders:
                loader.next_batch()
                ids += loader.last_ids
        seen[world] = sorted(ids)
        counts = np.bincount([k for k, _, _ in ids], minlength=3) / len(ids)
        assert len(ids) == 1000 and np.abs(counts - [0.6, 0.3, 0.1]).max() <= 0.01, counts
        state = loaders[0].state_dict()["source_windows"]
        assert sum(state.values()) == 1000 and abs(state["input"] / 1000 - 0.6) <= 0.01
    assert seen[1] == seen[2]


def test_a_mixture_resumes_exactly(shared, prepared):
    cfg = _mixture_cfg(shared, prepared["c4"][1])
    mixture = load_documents(cfg)
    a = _loader(mixture, cfg, seq_len=300)
    _batches(a, 10)
    state = json.loads(json.dumps(a.state_dict()))
    b = _loader(mixture, cfg, seq_len=300)
    assert isinstance(b, MixtureLoader)
    b.load_state_dict(state)
    assert _same(_batches(a, 40), _batches(b, 40))
    one = _loader(load_documents(DataConfig(source=str(shared(C4)), num_streams=4)), DataConfig(num_streams=4))
    with pytest.raises(ValueError, match="resume with the data settings the run was started with"):
        b.load_state_dict(one.state_dict())


def test_sft_records_stream_with_their_masks(shared):
    """Alpaca records streamed pack as the indexed records do (prompts masked), bad ones skipped alike."""
    cfg = DataConfig(source=str(shared(ALPACA)), task="sft", num_streams=2, shuffle=False, skip_bad_records=True)
    indexed = load_documents(cfg)
    streamed = load_documents(dataclasses.replace(cfg, streaming=True))
    want = _batches(_loader(indexed, cfg, seq_len=256), 15)
    got = _batches(_loader(streamed, dataclasses.replace(cfg, streaming=True), seq_len=256), 15)
    assert _same(want, got) and any((b[1] == -100).any() for b in got)
