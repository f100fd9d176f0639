"""Model families: one registry entry per family says what parallel/ and the trainer need of it.

This first cut holds the TP plan; the family's args, module, flavors, HF names, init and FLOPs move
here as the second family (Qwen3) arrives (issue 10).
"""

from collections.abc import Callable
from dataclasses import dataclass

from parallel.tp import TPPlan
from trainer.model.llama_parallel import llama_tp_plan


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # (model or pipeline stage, loss_parallel=, styles=) -> its tensor-parallel plan
    tp_plan: Callable[..., TPPlan]


FAMILIES = {"llama": ModelFamily(name="llama", tp_plan=llama_tp_plan)}


def family_of(args) -> ModelFamily:
    """The family of a model's args (Llama is the only one yet)."""
    return FAMILIES["llama"]
