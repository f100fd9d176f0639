"""Model converters: the transforms a config chooses, each one object that the trainer, the plan, the
dry run and the exports ask instead of testing config keys themselves (torchtitan's model converters).

A converter changes the model in place on the meta device, before the pipeline split and
parallelization, keeping the base's parameter names. Converters run in a fixed order: float8's linear
swap first (fp8/), then the adapters (over a 4-bit base or not), which wrap what float8 left. Every
hook has a do-nothing default, so a converter states only what it needs.
"""

from pathlib import Path

import torch
from torch import nn

from trainer.config import Config
from trainer.model.llama_parallel import LinearStyles


class ModelConverter:
    name = "converter"
    # Checkpoints hold only the trainable parameters: the rest is rebuilt the same way at every start.
    checkpoints_trainable_only = False
    # How the modules this converter creates split under tensor parallelism (None: the plain styles).
    linear_styles: LinearStyles | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> "ModelConverter | None":
        """The converter if the config asks for it, else None."""
        return None

    def check(self, meta: nn.Module, dims) -> None:
        """Raises ConfigError for what this converter cannot do with this model and layout (on meta)."""

    def convert(self, model: nn.Module) -> None:
        """Swaps modules in place, on the meta device."""

    def finish_unit(self, pieces: list[tuple[str, nn.Module]], *, shards: int, seed: int, frozen_dtype: torch.dtype) -> None:
        """Runs on each FSDP unit right after its base weights are in place and before FSDP shards it,
        with the (whole-model name, module) pieces it holds: the place to change a module's dtype or type
        as it loads (FSDP2 cannot follow such a change afterwards), or to initialise new parameters."""

    def checkpoint_entries(self) -> dict[str, dict]:
        """Extra plain entries a checkpoint carries and a resume must find equal (what it was built over)."""
        return {}

    def after_optimizer_step(self, parts: list[nn.Module]) -> None:
        """Runs on every rank after each optimizer step that was taken, and once before the first step,
        when the weights are in place (built, and restored if resuming): whatever it derives from the
        weights is then the same in a resumed run as in an uninterrupted one."""

    def describe(self) -> str:
        """Words for the start line, e.g. ' (over a 4-bit nf4 base)'."""
        return ""

    def report(self) -> list[str]:
        """Lines for the start of a run, after convert(): what it converted, what it left and why."""
        return []

    def fast_flops(self, model: nn.Module) -> tuple[str, float, float, str] | None:
        """For MFU: (number format, FLOPs per token that run in it, its peak over the bf16 peak, where that
        ratio came from), for the part of the model's FLOPs this converter moves to a faster format."""
        return None

    def load_run(self, step_path: Path) -> nn.Module | None:
        """The whole model of this run rebuilt in one process from its checkpoint at `step_path` (exports
        of pipeline runs), if this converter's checkpoints cannot be read as a plain model's."""
        return None

    def export(self, model: nn.Module, export_dir: Path, *, dtype: torch.dtype, token_ids: dict) -> dict[Path, str] | None:
        """Writes this converter's exports and returns {directory: what it holds}; None leaves the model's
        plain Hugging Face export to the trainer."""
        return None

    def count_adapted(self, parts: list[nn.Module]) -> int:
        """For the dry run: how many base weights this converter stores its own way."""
        return 0

    def gathered_bytes(self, model: nn.Module, compute_bytes: int) -> float | None:
        """For the dry run: bytes per block parameter that FSDP gathers, if not the compute dtype's."""
        return None

    def memory(self, model: nn.Module, *, micro_tokens: int, tp: int) -> dict[str, float]:
        """For the dry run: bytes per rank this converter adds, by label."""
        return {}

    def weight_bytes(self, *, params: float, trainable: float, adapted: float, share: float, compute_bytes: int,
                     dp_shard: int) -> tuple[float, str, float] | None:
        """For the dry run: (bytes of this rank's weights, label, bytes per gathered parameter), or None
        for plain fp32 parameters."""
        return None


def convert(model: nn.Module, converters: list[ModelConverter]) -> nn.Module:
    for converter in converters:
        converter.convert(model)
    return model


def linear_styles(converters: list[ModelConverter]) -> LinearStyles:
    """Each converter's styles claim the modules it created; the plain styles take the rest."""
    return LinearStyles.combine([c.linear_styles for c in converters if c.linear_styles is not None])
