"""What data.source (or data.sources) names, loaded as the right kind of documents, and its loader."""

from trainer.config import ConfigError
from trainer.config.schema import DataConfig
from trainer.data.documents import read_documents
from trainer.data.loader import PackedLoader
from trainer.data.mixture import MixtureLoader, load_mixture
from trainer.data.shards import PreparedDocuments, is_prepared
from trainer.data.streaming import StreamedSource


def load_documents(cfg: DataConfig):
    """A mixture of sources (data.sources: Mixture), a prepared directory's token ids (PreparedDocuments), a
    source to stream (data.streaming: StreamedSource), or texts / records to tokenize (read_documents)."""
    if cfg.sources:
        return load_mixture(cfg, load_documents)
    if cfg.format != "auto" and (cfg.source == "stdlib" or cfg.source.startswith("hub:")):
        raise ConfigError(f"data.format={cfg.format} says how to read local files, but data.source={cfg.source} is not "
                          f"files: leave data.format=auto, or point data.source at your files")
    if is_prepared(cfg.source):
        if cfg.streaming:
            raise ConfigError(f"data.source={cfg.source} is prepared tokens, which are read by memory map (never whole) "
                              f"already: set data.streaming=false")
        return PreparedDocuments(cfg.source)
    if cfg.streaming:
        return StreamedSource(cfg)
    return read_documents(cfg)


def make_loader(docs, tokenizer, cfg: DataConfig, seq_len: int, local_batch_size: int, dp_rank: int, dp_size: int,
                seed: int) -> PackedLoader:
    """The loader for what load_documents returned: one source's, or a mixture's."""
    loader = MixtureLoader if getattr(docs, "mixture", False) else PackedLoader
    return loader(docs, tokenizer, cfg, seq_len, local_batch_size, dp_rank, dp_size, seed)
