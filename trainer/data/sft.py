"""Supervised finetuning records -> token ids with the prompt masked out of the loss.

Records are Alpaca (instruction / input / output), OpenAI `messages` (role / content) or ShareGPT
(`conversations` of from / value). They are rendered with the tokenizer's chat template where it has
one, else with a plain role-header format. Only assistant turns (and the end token after them) are
trained: a masked token is stored as -(id + 1) in the packed stream, which the loader turns into an
ignored label, so packing and its saved state need to know nothing about masks.
"""

from trainer.errors import DataError

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool",
}


def masked(ids: list[int]) -> list[int]:
    return [-(i + 1) for i in ids]


def detect_format(columns: list[str], name: str) -> str:
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    raise DataError(
        f"{name}: cannot tell the record format from its fields ({', '.join(columns)}); expected messages, "
        f"conversations, or instruction + output; set data.sft_format"
    )


def to_messages(record: dict, fmt: str, index: int, name: str) -> list[dict]:
    """A record as a list of {role, content}; a bad record raises DataError naming its index."""

    def bad(why: str) -> DataError:
        return DataError(f"{name}: record {index}: {why}")

    if fmt == "alpaca":
        for field in ("instruction", "output"):
            if not isinstance(record.get(field), str):
                raise bad(f"missing field '{field}'")
        if not record["output"].strip():
            raise bad("empty 'output'")
        prompt = record["instruction"]
        if (record.get("input") or "").strip():
            prompt += "\n\n" + record["input"]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if fmt == "messages":
        turns = record.get("messages")
        if not isinstance(turns, list) or not turns:
            raise bad("missing or empty field 'messages'")
        messages = [{"role": t.get("role"), "content": t.get("content")} for t in turns if isinstance(t, dict)]
    else:
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise bad("missing or empty field 'conversations'")
        messages = []
        for t in turns:
            role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
            if role is None:
                raise bad(f"unknown speaker {t.get('from') if isinstance(t, dict) else t!r} (known: {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": role, "content": t.get("value")})
    if len(messages) != len(turns) or any(not isinstance(m["content"], str) or not m["role"] for m in messages):
        raise bad("every turn needs a role and text content")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise bad("no assistant turn to learn from")
    if any(not m["content"].strip() for m in assistant):
        raise bad("an assistant turn is empty")
    return messages


class SftTokenizer:
    """Record index -> packed entries (prompt tokens negative-coded); bad records raise or give []."""

    def __init__(self, records, tokenizer, fmt: str, name: str, skip_bad: bool):
        self.records, self.tokenizer, self.name, self.skip_bad = records, tokenizer, name, skip_bad
        self.fmt = detect_format(records.column_names, name) if fmt == "auto" else fmt
        self.template = getattr(tokenizer, "chat_template", None)

    def __call__(self, index: int) -> list[int]:
        return self.encode(self.records[index], index)

    def encode(self, record: dict, index: int) -> list[int]:
        """A record's packed entries; `index` names it in errors."""
        try:
            messages = to_messages(record, self.fmt, index, self.name)
        except DataError:
            if self.skip_bad:
                return []
            raise
        return self._with_template(messages) if self.template else self._plain(messages)

    def _plain(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        out = masked([tok.bos_id]) if tok.bos_id is not None else []
        for m in messages:
            header = tok.encode(f"<|{m['role']}|>\n")
            if m["role"] == "assistant":
                end = [tok.eos_id] if tok.eos_id is not None else []
                out += masked(header) + tok.encode(m["content"]) + end
            else:
                out += masked(header + tok.encode(m["content"] + "\n"))
        return out

    def _with_template(self, messages: list[dict]) -> list[int]:
        """Each assistant turn's tokens are those the template adds between the conversation up to it
        (with the generation prompt) and the conversation including it."""
        render = self.tokenizer.tokenizer.apply_chat_template
        full = self.tokenizer.encode(render(messages, tokenize=False))
        trained = [False] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.tokenizer.encode(render(messages[:i], tokenize=False, add_generation_prompt=True)))
            end = len(self.tokenizer.encode(render(messages[: i + 1], tokenize=False)))
            for j in range(start, min(end, len(full))):
                trained[j] = True
        return [t if keep else -(t + 1) for t, keep in zip(full, trained)]


def check_records(sft: SftTokenizer) -> list[int]:
    """Every record is checked at start-up (SFT sets are small): the first bad one raises, naming its
    index, unless data.skip_bad_records; then the skipped indices are returned, to be reported."""
    skipped = []
    for i in range(len(sft.records)):
        try:
            to_messages(sft.records[i], sft.fmt, i, sft.name)
        except DataError:
            if not sft.skip_bad:
                raise
            skipped.append(i)
    return skipped
