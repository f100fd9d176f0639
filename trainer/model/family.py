"""Model families: one registry entry per family says what the trainer and parallel/ need of it.

A family's shape is a ModelArgs with `family` naming its entry; flavors (named shapes) and the Hugging
Face names and config live beside the model file and are shared where the families agree.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from parallel.tp import TPPlan
from trainer.model.args import ModelArgs
from trainer.model.llama import Transformer
from trainer.model.llama_parallel import llama_tp_plan
from trainer.model.qwen3 import Qwen3Transformer
from trainer.model.qwen3_parallel import qwen3_tp_plan


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model: type[nn.Module]  # built from ModelArgs, on whatever device is current
    # (model or pipeline stage, loss_parallel=, styles=) -> its tensor-parallel plan
    tp_plan: Callable[..., TPPlan]
    hf_model_type: str  # config.json's model_type
    hf_architecture: str  # config.json's architectures[0]


FAMILIES = {
    "llama": ModelFamily("llama", Transformer, llama_tp_plan, "llama", "LlamaForCausalLM"),
    "qwen3": ModelFamily("qwen3", Qwen3Transformer, qwen3_tp_plan, "qwen3", "Qwen3ForCausalLM"),
}


def family_of(args: ModelArgs) -> ModelFamily:
    return FAMILIES[args.family]
