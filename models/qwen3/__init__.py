"""The Qwen3 (dense) family: its registry entry. Dense blocks with QK-norm: the shared dense answers, its
own modules, TP plan, names and HF config."""

from models.common import dense
from models.family import HFFormat, ModelFamily
from models.qwen3 import hf
from models.qwen3.args import Qwen3Args
from models.qwen3.flavors import FLAVORS
from models.qwen3.model import Qwen3Transformer
from models.qwen3.parallel import qwen3_tp_plan
from parallel.pp import split_stages

FAMILY = ModelFamily(
    name="qwen3", args=Qwen3Args, model=Qwen3Transformer, flavors=FLAVORS,
    hf=HFFormat(model_type="qwen3", args_from_config=hf.args_from_config, config=hf.config,
                to_hf=hf.NAMES.to_hf, from_hf=hf.NAMES.from_hf),
    tp_plan=qwen3_tp_plan, split_stages=split_stages, init_std=dense.init_std, flops_per_token=dense.flops_per_token,
    activation_elements=dense.activation_elements, tp_sizes=dense.tp_sizes, adapter_targets=dense.ADAPTER_TARGETS,
)
