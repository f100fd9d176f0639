"""Held-out documents for validation: a separate source, or a share of the training documents that is
then never trained on. A document is held out by its index alone (a hash, not the seed or the number of
ranks), so every run over the same data validates on the same documents."""

import dataclasses
import zlib

from trainer.config.schema import DataConfig, EvalConfig
from trainer.data.documents import check_num_streams
from trainer.data.loader import check_enough_tokens
from trainer.errors import ConfigError, DataError, UserError


class DocumentSubset:
    """Some documents of a source, under new indices 0 .. n-1."""

    def __init__(self, docs, indices: list[int], name: str):
        self.docs, self.indices, self.name = docs, indices, name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.docs[self.indices[i]]

    @property
    def column_names(self) -> list[str]:
        return self.docs.column_names

    @property
    def prepared(self) -> bool:
        return getattr(self.docs, "prepared", False)


def is_held_out(index: int, fraction: float) -> bool:
    return zlib.crc32(f"held-out/{index}".encode()) < fraction * 2**32


def split_documents(docs, fraction: float) -> tuple[DocumentSubset, DocumentSubset]:
    """(the documents to train on, the held-out ones)."""
    held = [i for i in range(len(docs)) if is_held_out(i, fraction)]
    kept = [i for i in range(len(docs)) if not is_held_out(i, fraction)]
    if not held:
        raise DataError(f"eval.split_fraction={fraction} holds out none of the {len(docs)} documents of {docs.name}: "
                        f"raise it, or give eval.source")
    if not kept:
        raise DataError(f"eval.split_fraction={fraction} holds out every document of {docs.name}: lower it")
    return (DocumentSubset(docs, kept, f"{docs.name} (without the held-out {len(held)})"),
            DocumentSubset(docs, held, f"{len(held)} held-out documents of {docs.name}"))


def training_and_eval_documents(data: DataConfig, e: EvalConfig, load_documents):
    """(training documents, validation documents or None) as the config asks."""
    docs = load_documents(data)
    if e.source is not None:
        try:
            return docs, load_documents(dataclasses.replace(data, source=e.source, sources=[]))
        except DataError as err:  # the reader names data.source; here the files came from eval.source
            message = str(err).replace("data.source", "eval.source")
            raise DataError(message if "eval.source" in message else f"eval.source: {message}") from None
    if e.split_fraction > 0:
        if getattr(docs, "mixture", False):
            raise ConfigError(f"eval.split_fraction={e.split_fraction} with data.sources: hold out data per source "
                              f"(data.sources[i].eval_source) or give eval.source")
        if getattr(docs, "streamed", False):
            raise ConfigError(f"eval.split_fraction={e.split_fraction} holds documents out by their index, which a streamed "
                              f"source has not: give eval.source (streamed too, or not), or set data.streaming=false")
        return split_documents(docs, e.split_fraction)
    return docs, None


def check_eval_tokens(docs, tokenizer, data: DataConfig, seq_len: int) -> None:
    """The held-out documents fill the validation batches' streams (messages say which data is short)."""
    try:
        check_num_streams(docs, data.num_streams, data.text_sample_by)
        check_enough_tokens(docs, tokenizer, data, seq_len)
    except UserError as err:
        raise type(err)(f"eval: {err}") from None
