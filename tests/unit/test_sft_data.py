"""Supervised-finetuning records on real data: rendering, prompt masking, packing, and bad records."""

import json

import pytest

from trainer.config.schema import DataConfig, TokenizerConfig
from trainer.data import DataError, PackedLoader, check_enough_tokens, load_documents
from trainer.data.sft import SftTokenizer
from trainer.tokenizer import build_tokenizer


def _trained_text(tok, entries):
    return tok.decode([t for t in entries if t >= 0])


def _phi3_records(shared, name):
    """Records of a shared chat file with the Phi-3 tokenizer (which has a chat template)."""
    tok = build_tokenizer(TokenizerConfig(path=str(shared("tokenizers/phi3-mini"))))
    docs = load_documents(DataConfig(source=str(shared(f"instruct/llamafactory/{name}")), task="sft"))
    return tok, docs, SftTokenizer(docs, tok, "auto", docs.name, skip_bad=False)


def test_chat_template_trains_only_assistant_turns(shared):
    tok, docs, sft = _phi3_records(shared, "kto_en_demo.json")
    assert sft.fmt == "messages"
    index = next(i for i in range(len(docs)) if len(docs[i]["messages"]) >= 4)
    record = docs[index]
    entries = sft(index)
    # The whole conversation is there, exactly as the template renders it...
    rendered = tok.tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert [t if t >= 0 else -t - 1 for t in entries] == tok.encode(rendered)
    # ...and the trained tokens are the assistant turns (each closed by its end token), nothing else.
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    trained = _trained_text(tok, entries)
    for answer in answers:
        assert answer.strip()[:40] in trained
    for question in (m["content"] for m in record["messages"] if m["role"] == "user"):
        assert question.strip()[:40] not in trained
    assert trained.count("<|end|>") == len(answers)


def test_sharegpt_tool_calls_render(shared):
    tok, docs, sft = _phi3_records(shared, "glaive_toolcall_en_demo.json")
    assert sft.fmt == "sharegpt"
    with_call = next(i for i in range(len(docs)) if any(t["from"] == "function_call" for t in docs[i]["conversations"]))
    trained = _trained_text(tok, sft(with_call))
    call = next(t["value"] for t in docs[with_call]["conversations"] if t["from"] == "function_call")
    assert json.loads(call)["name"] in trained  # the model learns to emit the call


def test_alpaca_without_template_masks_the_prompt_and_packs(shared, capsys):
    tok = build_tokenizer(TokenizerConfig(path=str(shared("tokenizers/tok512/tok512.model"))))
    cfg = DataConfig(
        source=str(shared("instruct/alpaca/alpaca_data_first2000.json")), task="sft", num_streams=1, shuffle=False,
        skip_bad_records=True,
    )
    docs = load_documents(cfg)
    sft = SftTokenizer(docs, tok, "auto", docs.name, skip_bad=False)
    assert sft.fmt == "alpaca"
    entries = sft(0)
    assert _trained_text(tok, entries).strip() == docs[0]["output"].strip()  # the answer (and EOS) only
    assert entries[-1] == tok.eos_id

    check_enough_tokens(docs, tok, cfg, seq_len=128)
    # Four records of the real file have an empty output (284: "Standardize the following date...").
    assert "skipping 4 bad records" in capsys.readouterr().out
    loader = PackedLoader(docs, tok, cfg, seq_len=128, local_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    inputs, labels, _ = loader.next_batch()
    stream = [e for i in range(3) for e in sft(i)]
    flat = [t if t >= 0 else -t - 1 for t in stream]
    # Packing keeps the masks: labels are the next token where it is trained, ignored where not.
    assert inputs[0].tolist() == flat[:128]
    expected = [flat[j + 1] if stream[j + 1] >= 0 else -100 for j in range(128)]
    assert labels[0].tolist() == expected
    assert 0 < int((labels != -100).sum()) < labels.numel()


BAD = {
    "missing field": ({"instruction": "Say hi"}, "record 1: missing field 'output'"),
    "empty output": ({"instruction": "Say hi", "input": "", "output": "  "}, "record 1: empty 'output'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_alpaca_records_are_named_or_skipped(tmp_path, capsys, case):
    bad, message = BAD[case]
    good = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, bad] + [good] * 30))
    tok = build_tokenizer(TokenizerConfig())
    cfg = DataConfig(source=str(path), task="sft", sft_format="alpaca", num_streams=1)
    with pytest.raises(DataError, match=message):
        check_enough_tokens(load_documents(cfg), tok, cfg, seq_len=64)
    cfg.skip_bad_records = True
    check_enough_tokens(load_documents(cfg), tok, cfg, seq_len=64)
    out = capsys.readouterr().out
    assert "skipping 1 bad records" in out and "indices [1]" in out


def test_bad_chat_records(tmp_path):
    tok = build_tokenizer(TokenizerConfig())
    for records, message in [
        ([{"messages": [{"role": "user", "content": "hi"}]}], "record 0: no assistant turn"),
        ([{"conversations": [{"from": "alien", "value": "hi"}]}], "record 0: unknown speaker 'alien'"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}], "record 0: an assistant turn is empty"),
    ]:
        path = tmp_path / "chat.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in records * 10))
        cfg = DataConfig(source=str(path), task="sft", num_streams=1)
        with pytest.raises(DataError, match=message):
            check_enough_tokens(load_documents(cfg), tok, cfg, seq_len=64)


def test_packed_records_with_document_attention_each_train_as_if_alone(shared):
    """data.attention=document (sft's default): every record packed into a window gets the per-token
    losses it gets when run by itself, unpacked. The loader's document ids mark where records begin,
    and survive a save and restore of the data position mid-window."""
    import torch
    import torch.nn.functional as F

    from tests.helpers import build_adapted, flavor_args
    from trainer.config.schema import AdaptersConfig

    tok = build_tokenizer(TokenizerConfig(path=str(shared("tokenizers/tok512/tok512.model"))))
    cfg = DataConfig(source=str(shared("instruct/alpaca/alpaca_data_first2000.json")), task="sft", num_streams=1,
                     shuffle=False)
    docs = load_documents(cfg)
    sft = SftTokenizer(docs, tok, "auto", docs.name, skip_bad=False)
    loader = PackedLoader(docs, tok, cfg, seq_len=512, local_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    loader.next_batch()
    saved = loader.state_dict()
    inputs, labels, documents = loader.next_batch()
    restored = PackedLoader(docs, tok, cfg, seq_len=512, local_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    restored.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(restored.next_batch(), (inputs, labels, documents)))
    # Records begin where the ids step up: the lengths of the records packed after the window's first.
    lengths = [len(sft(i)) for i in range(12)]
    steps = documents[0].unique_consecutive(return_counts=True)[1].tolist()
    assert any(steps[1:-1] == lengths[k : k + len(steps) - 2] for k in range(12))

    torch.manual_seed(0)
    model = build_adapted(flavor_args("debug", vocab_size=512, max_seq_len=512), AdaptersConfig(), init_from=None,
                          seed=0).eval()
    with torch.no_grad():
        packed = F.cross_entropy(model(inputs, documents=documents).transpose(1, 2), labels, reduction="none")
        worst, records = 0.0, 0
        for row in range(2):
            ids, counts = documents[row].unique_consecutive(return_counts=True)
            start = 0
            for n in counts.tolist():
                alone = model(inputs[row : row + 1, start : start + n])[0]
                want = F.cross_entropy(alone, labels[row, start : start + n], reduction="none")
                worst = max(worst, (packed[row, start : start + n] - want).abs().max().item())
                start, records = start + n, records + 1
    print(f"\nSFT packed vs alone: {records} records, max |per-token loss diff| {worst:.2e}")
    assert records >= 4 and worst < 1e-5
