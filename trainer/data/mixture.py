"""data.sources: training windows drawn from several sources by weight, the same on any number of ranks.

Global window n (counted over all ranks, in step order, as for one source) comes from source k(n) and, within
it, from that source's packed stream n % num_streams: every source is split into num_streams streams as a
single source is, and data-parallel rank r reads the same stream ids of every source. k(n) is a pure function
of n, the weights and the seed: u(n) = n x 2^64/phi + seed' (mod 2^64), a Weyl sequence, which visits [0, 2^64)
evenly at every scale, and k(n) is the source whose share of [0, 2^64) holds u(n). So any span of N windows
holds each source's share to within a few windows (not the sqrt(N) of independent draws), every stream of a
source is read evenly, and a resume needs no state beyond the windows consumed and each stream's position.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from trainer.config.checks import source_names
from trainer.config.schema import DataConfig
from trainer.data.loader import PackedLoader, make_cursor, make_tokenize
from trainer.data.packing import PackedStream
from trainer.errors import UserError
from trainer.metrics import tokens_label

_WEYL = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd
_SEED_MIX = 0xD1B54A32D192ED03


class Component(NamedTuple):
    name: str
    docs: object  # any documents load_documents returns
    cfg: DataConfig  # data's settings with the source's own
    weight: float


class Mixture:
    """The sources of data.sources, loaded: what load_documents returns for a mixture."""

    prepared = streamed = False
    mixture = True

    def __init__(self, components: list[Component], held_out: dict[str, object]):
        self.components = components
        self.held_out = held_out  # each source's eval_source, loaded, by name
        self.name = "a mixture of " + ", ".join(f"{c.name} ({c.weight:g})" for c in components)


def component_configs(data: DataConfig) -> list[tuple[str, DataConfig, float, str | None]]:
    """(name, its DataConfig, weight, eval source) for each of data.sources."""
    out = []
    for name, src in zip(source_names(data.sources), data.sources):
        own = {f: getattr(src, f) for f in ("format", "text_field", "text_sample_by", "hub_config", "split", "streaming")
               if getattr(src, f) is not None}
        out.append((name, dataclasses.replace(data, source=src.source, sources=[], **own), src.weight, src.eval_source))
    return out


def pick_sources(first: int, count: int, step: int, thresholds: np.ndarray, seed: int) -> np.ndarray:
    """k(n) for n = first, first + step, ... (count of them)."""
    n = first + step * np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = n * np.uint64(_WEYL) + np.uint64((seed * _SEED_MIX) % 2**64)
    return np.searchsorted(thresholds, u, side="right")


class MixtureLoader(PackedLoader):
    """PackedLoader's interface over a Mixture; last_ids are (source, stream, index within the stream)."""

    def __init__(self, mixture: Mixture, tokenizer, cfg: DataConfig, seq_len: int, local_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int):
        self.seq_len, self.batch_size, self.seed = seq_len, local_batch_size, seed
        self.dp_rank, self.dp_size, self.num_streams = dp_rank, dp_size, cfg.num_streams
        self.names = [c.name for c in mixture.components]
        weights = np.array([c.weight for c in mixture.components], dtype=np.float64)
        shares = np.cumsum(weights / weights.sum())[:-1]
        # Source k holds u in [thresholds[k-1], thresholds[k]); a weight of 0 gives an empty interval.
        self.thresholds = np.array([min(int(s * 2**64), 2**64 - 1) for s in shares], dtype=np.uint64)
        self.sources = {}
        for k, c in enumerate(mixture.components):
            tokenize = make_tokenize(c.docs, tokenizer, c.cfg)
            for s in range(dp_rank, cfg.num_streams, dp_size):
                self.sources[k, s] = PackedStream(make_cursor(c.docs, s, tokenize, c.cfg, seed), seq_len + 1, c.docs.name)
        self.next_global = dp_rank
        self.source_windows = np.zeros(len(self.names), dtype=np.int64)  # over all ranks, so far
        self.last_ids: list[tuple[int, int, int]] = []

    def _windows(self):
        first = self.next_global - self.dp_rank  # windows consumed by all ranks before this microbatch
        picks = pick_sources(self.next_global, self.batch_size, self.dp_size, self.thresholds, self.seed)
        for k in picks:
            s = self.next_global % self.num_streams
            window, starts, (_, index) = self.sources[int(k), s].next_window()
            yield window, starts, (int(k), s, index)
            self.next_global += self.dp_size
        # Every rank counts the whole microbatch's windows (its own and the other ranks'), so the per-source
        # totals are global without a collective.
        everyone = pick_sources(first, self.batch_size * self.dp_size, 1, self.thresholds, self.seed)
        self.source_windows += np.bincount(everyone, minlength=len(self.names))

    def state_dict(self) -> dict:
        return {
            "windows_consumed": self.next_global - self.dp_rank,
            "streams": {f"{self.names[k]}/{s}": st.state_dict() for (k, s), st in self.sources.items()},
            "source_windows": {n: int(w) for n, w in zip(self.names, self.source_windows)},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("source_windows")
        if saved is None:
            raise ValueError("the saved data state is of one source, and this run reads a mixture (data.sources): "
                             "resume with the data settings the run was started with")
        missing = [n for n in self.names if n not in saved]
        if missing:
            raise ValueError(f"the saved data state lacks mixture source {missing[0]!r} (its sources: "
                             f"{', '.join(saved)}); resume with the sources the run was started with")
        self.next_global = state["windows_consumed"] + self.dp_rank
        self.source_windows = np.array([saved[n] for n in self.names], dtype=np.int64)
        for (k, s), stream in self.sources.items():
            key = f"{self.names[k]}/{s}"
            if key not in state["streams"]:
                raise ValueError(f"the saved data state lacks stream {key} (was data.num_streams changed?)")
            stream.load_state_dict(state["streams"][key])


def source_scalars(state: dict, seq_len: int) -> dict[str, float]:
    """From a mixture loader's state: each source's share of the windows so far (data/NAME, on the console)
    and the input tokens trained from it (data/tokens/NAME, TensorBoard), over all ranks."""
    windows = state["source_windows"]
    total = max(1, sum(windows.values()))
    return {**{f"data/{name}": w / total for name, w in windows.items()},
            **{f"data/tokens/{name}": float(w * seq_len) for name, w in windows.items()}}


def mixture_summary(state: dict, seq_len: int) -> str:
    """The end-of-run line: the input tokens trained from each source of the mixture, over all ranks."""
    windows = state["source_windows"]
    total = max(1, sum(windows.values()))
    parts = ", ".join(f"{name} {tokens_label(w * seq_len)} ({100 * w / total:.1f}%)" for name, w in windows.items())
    return f"data: trained {tokens_label(total * seq_len)} tokens of the mixture: {parts}"


def load_mixture(data: DataConfig, load_documents) -> Mixture:
    """Each of data.sources loaded as data.source would be, with its held-out source; errors name the entry."""
    components, held_out = [], {}
    for i, (name, cfg, weight, eval_source) in enumerate(component_configs(data)):
        where = f"data.sources[{i}] ({name})"
        components.append(Component(name, _load(load_documents, cfg, f"{where}.source"), cfg, weight))
        if eval_source is not None:
            held_out[name] = _load(load_documents, dataclasses.replace(cfg, source=eval_source), f"{where}.eval_source")
    return Mixture(components, held_out)


def _load(load_documents, cfg: DataConfig, key: str):
    try:
        return load_documents(cfg)
    except UserError as err:  # the readers name data.source; here it is one entry's key
        message = str(err)
        raise type(err)(message.replace("data.source=", f"{key}=") if "data.source=" in message else f"{key}: {message}") from None
