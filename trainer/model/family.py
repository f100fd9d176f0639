"""Model families: one registry entry per family holds everything the trainer, the weights code and
parallel/ ask of a family. A shape (ModelArgs) names its family; nothing outside the entry and the
family's model file tests which family it is. Qwen3 shares Llama's pieces where the two agree (names,
init, FLOPs, adapter targets, pipeline split) and brings its own module, TP plan and HF config.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from parallel.pp import split_stages
from parallel.tp import TPPlan
from trainer.model import llama, qwen3
from trainer.model.args import ModelArgs
from trainer.model.flavors import FLAVORS
from trainer.model.hf_names import hf_to_ours, ours_to_hf
from trainer.model.llama_parallel import llama_tp_plan
from trainer.model.qwen3_parallel import qwen3_tp_plan


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model: type[nn.Module]  # built from ModelArgs, on whatever device is current
    # (model or pipeline stage, loss_parallel=, styles=) -> its tensor-parallel plan
    tp_plan: Callable[..., TPPlan]
    # (meta model, pp_rank=, pp_size=, num_stages=) -> [(stage index, stage module)]
    split_stages: Callable[..., list]
    init_std: Callable[[str, ModelArgs], float | None]  # a parameter's init std (None: ones)
    flops_per_token: Callable[[ModelArgs, int], int]  # training FLOPs per token at a sequence length
    adapter_targets: dict[str, str]  # adapters.targets short names -> module-name patterns
    hf_model_type: str  # config.json's model_type
    hf_architecture: str  # config.json's architectures[0]
    hf_config_class: str  # transformers' config class, whose installed version decides the file's layout
    hf_extra_args: Callable[[dict, int], dict]  # (HF config, head_dim) -> this family's own ModelArgs fields
    to_hf: Callable[[str], str]  # our parameter name -> the Hugging Face one
    from_hf: Callable[[str], str | None]  # and back (None: a tensor we do not keep)

    @property
    def flavors(self) -> list[str]:
        return [name for name, fields in FLAVORS.items() if fields.get("family", "llama") == self.name]


_SHARED = dict(split_stages=split_stages, init_std=llama.init_std, flops_per_token=llama.flops_per_token,
               adapter_targets=llama.ADAPTER_TARGETS, to_hf=ours_to_hf, from_hf=hf_to_ours)

FAMILIES = {
    "llama": ModelFamily(name="llama", model=llama.Transformer, tp_plan=llama_tp_plan, hf_model_type="llama",
                         hf_architecture="LlamaForCausalLM", hf_config_class="LlamaConfig",
                         hf_extra_args=llama.hf_extra_args, **_SHARED),
    "qwen3": ModelFamily(name="qwen3", model=qwen3.Qwen3Transformer, tp_plan=qwen3_tp_plan, hf_model_type="qwen3",
                         hf_architecture="Qwen3ForCausalLM", hf_config_class="Qwen3Config",
                         hf_extra_args=qwen3.hf_extra_args, **_SHARED),
}


def family_of(args: ModelArgs) -> ModelFamily:
    return FAMILIES[args.family]


def family_for_hf(model_type: str) -> ModelFamily | None:
    """The family of a Hugging Face config's model_type, or None."""
    return next((f for f in FAMILIES.values() if f.hf_model_type == model_type), None)
