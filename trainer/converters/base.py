"""The converter protocol: a model transform the config chooses by name (torchtitan's model converters).

A converter swaps modules of the model in place on the meta device, before the pipeline split and
parallelization, keeping the base's parameter names. Its eight hooks each have a do-nothing default, so a
converter states only what it needs. Answers about the converted model are small dataclasses:

- ConverterInfo, from info(): combined over the converters in their order by ConverterInfo.combine
  (flags: any; mappings: merged, a key may come from one converter only; sequences and words:
  concatenated; a fast matmul format: from one converter at most).
- MemoryEstimate, from memory(): a fold, in converter order: each converter gets the estimate the ones
  before it left and returns it updated.

A converter holds only its settings: anything about a model it converted is read back from that model,
so one converter object serves every model built from a config (the plan's, a rebuilt run's).
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from parallel.mesh import ParallelDims
from parallel.tp import LinearStyles


@dataclass(frozen=True)
class FastMatmuls:
    """The part of the model's FLOPs a converter moves to a faster number format (float8), for MFU."""

    format: str
    flops_per_token: float
    peak_ratio: float  # the format's peak FLOP/s over the high-precision peak
    source: str  # where that ratio came from


@dataclass(frozen=True)
class FixedEntry:
    """A plain entry a converter's checkpoints carry and a resume must find equal: what the run was built
    over (adapters: their frozen base). `mismatch` words the error, with {saved} and {ours}."""

    json: str
    mismatch: str


@dataclass(frozen=True)
class ConverterInfo:
    checkpoint_entries: dict[str, FixedEntry] = field(default_factory=dict)
    # How the modules it created split (None: the plain styles). Combined: every converter's, then the plain.
    tp_styles: LinearStyles | None = None
    describe: str = ""  # words for the start line, e.g. " (over a 4-bit nf4 base)"
    start_lines: tuple[str, ...] = ()  # what it converted and what it left, and why
    fast_matmuls: FastMatmuls | None = None
    # Library state the run needs while it is built and trains (parallel/library_patches.py), entered
    # by the trainer and undone when the run ends.
    run_patches: tuple[Callable[[], contextlib.AbstractContextManager], ...] = ()

    @staticmethod
    def combine(infos: "list[ConverterInfo]") -> "ConverterInfo":
        entries: dict[str, FixedEntry] = {}
        for info in infos:
            assert not entries.keys() & info.checkpoint_entries.keys(), "two converters checkpoint the same entry"
            entries.update(info.checkpoint_entries)
        fast = [i.fast_matmuls for i in infos if i.fast_matmuls is not None]
        assert len(fast) <= 1, "two converters claim a fast matmul format"
        styles = [i.tp_styles for i in infos if i.tp_styles is not None]
        return ConverterInfo(
            checkpoint_entries=entries, tp_styles=LinearStyles.combine(styles),
            describe="".join(i.describe for i in infos), start_lines=tuple(line for i in infos for line in i.start_lines),
            fast_matmuls=fast[0] if fast else None, run_patches=tuple(p for i in infos for p in i.run_patches),
        )


@dataclass(frozen=True)
class MemoryShape:
    """What the dry run knows of the most loaded rank, for converters' memory hooks."""

    model: nn.Module  # the whole converted model, on meta
    parts: list[nn.Module]  # that rank's part of it (pipeline stages)
    params: int  # parameters of those parts
    trainable: int
    share: float  # of those parameters this rank stores (TP and FSDP splits)
    compute_bytes: int
    dp_shard: int
    tp: int
    micro_tokens: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # bytes of this rank's stored weights
    weights_label: str
    gathered_bytes: float  # bytes per block parameter FSDP gathers
    extra: dict[str, float] = field(default_factory=dict)  # bytes by label that converters add
    # Weights (count, on this rank after FSDP's gather) rebuilt in the compute dtype at every use, forward and
    # backward: a 4-bit base's. The layout planner's time model charges each rebuild.
    dequantized: float = 0.0

    def replace(self, **changes) -> "MemoryEstimate":
        return dataclasses.replace(self, **changes)


class ModelConverter:
    name: ClassVar[str]
    # Converters that must come before this one when both are on (model.converters is checked).
    after: ClassVar[tuple[str, ...]] = ()
    # Its checkpoints hold only the trainable parameters: the rest is rebuilt the same way at every start
    # (and by anything that reads a checkpoint of the run: exports, generation).
    checkpoints_trainable_only: ClassVar[bool] = False
    # A model read back from its checkpoints (generation, evaluation of a run) is converted again: its
    # forward is not the plain model's (QAT rounds), though its checkpoints hold plain weights.
    reapplied_on_load: ClassVar[bool] = False

    def convert(self, meta: nn.Module, dims: ParallelDims) -> None:
        """Swaps modules in place, on the meta device; raises ConfigError first for what it cannot do with
        this model and layout."""

    def info(self, model: nn.Module) -> ConverterInfo:
        """What it tells the rest of the run about a model it converted."""
        return ConverterInfo()

    def finish_unit(self, pieces: list[tuple[str, nn.Module]], *, shards: int, seed: int, frozen_dtype: torch.dtype) -> None:
        """Runs on each FSDP unit right after its base weights are in place and before FSDP shards it,
        with the (whole-model name, module) pieces it holds: the place to change a module's dtype or type
        as it loads (FSDP2 cannot follow such a change afterwards), or to initialise new parameters."""

    def after_optimizer_step(self, parts: list[nn.Module]) -> None:
        """Runs on every rank after each optimizer step that was taken, and once before the first step,
        when the weights are in place (built, and restored if resuming): whatever it derives from the
        weights is then the same in a resumed run as in an uninterrupted one."""

    def before_step(self, parts: list[nn.Module], step: int) -> None:
        """Runs on every rank before training step `step` (1-based: the first step of a run is 1, of a run
        resumed from step N is N + 1): for what switches on at a step (QAT's start_step)."""

    def memory(self, shape: MemoryShape, estimate: MemoryEstimate) -> MemoryEstimate:
        """For the dry run: the per-rank estimate with this converter's effect."""
        return estimate

    def export_tensors(self, model: nn.Module) -> Iterable[tuple[str, torch.Tensor]] | None:
        """The (name, whole tensor) pairs of the model's plain Hugging Face export (adapters: merged into
        the base), for the exports derived from it (quantized); None: the model's own parameters."""
        return None

    def export(self, model: nn.Module, export_dir: Path, *, dtype: torch.dtype, token_ids: dict) -> dict[Path, str] | None:
        """Writes this converter's exports and returns {directory: what it holds}; None leaves the model's
        plain Hugging Face export to the trainer."""
        return None
