"""The Llama family (Llama 2 and 3): its registry entry. Dense blocks, so most answers are the shared
dense ones (models/common/dense.py)."""

from models.common import dense
from models.common.dense_tp import dense_tp_plan
from models.family import HFFormat, ModelFamily
from models.llama import hf
from models.llama.args import LlamaArgs
from models.llama.flavors import FLAVORS
from models.llama.model import LlamaTransformer
from parallel.pp import split_stages

FAMILY = ModelFamily(
    name="llama", args=LlamaArgs, model=LlamaTransformer, flavors=FLAVORS,
    hf=HFFormat(model_type="llama", args_from_config=hf.args_from_config, config=hf.config,
                to_hf=hf.NAMES.to_hf, from_hf=hf.NAMES.from_hf),
    tp_plan=dense_tp_plan, split_stages=split_stages, init_std=dense.init_std, flops_per_token=dense.flops_per_token,
    activation_elements=dense.activation_elements, tp_sizes=dense.tp_sizes, adapter_targets=dense.ADAPTER_TARGETS,
)
