"""The Qwen3-MoE family: its registry entry. Qwen3's attention and names, mixture-of-experts feed-forwards
(models/common/moe.py) with Qwen3-MoE's routing or DeepSeek-V3's, answers of its own for FLOPs (active
parameters), activation memory and initialisation, and expert weights that HF files hold per expert."""

from models.family import HFFormat, ModelFamily
from models.qwen3_moe import hf, sizes
from models.qwen3_moe.args import Qwen3MoEArgs
from models.qwen3_moe.flavors import FLAVORS
from models.qwen3_moe.model import Qwen3MoETransformer
from models.qwen3_moe.parallel import qwen3_moe_tp_plan
from parallel.pp import split_stages

FAMILY = ModelFamily(
    name="qwen3_moe", args=Qwen3MoEArgs, model=Qwen3MoETransformer, flavors=FLAVORS,
    hf=HFFormat(model_type="qwen3_moe", args_from_config=hf.args_from_config, config=hf.config, to_hf=hf.NAMES.to_hf,
                from_hf=hf.NAMES.from_hf, joined=hf.EXPERTS),
    tp_plan=qwen3_moe_tp_plan, split_stages=split_stages, init_std=sizes.init_std,
    flops_per_token=sizes.flops_per_token, activation_elements=sizes.activation_elements, tp_sizes=sizes.tp_sizes,
    adapter_targets=sizes.ADAPTER_TARGETS, check_layout=sizes.check_layout,
)
