"""The Qwen3 (dense) family: its registry entry. Dense blocks with QK-norm: the shared dense answers, its
own modules, TP plan, names and HF config."""

from models.family import dense_family
from models.qwen3 import hf
from models.qwen3.args import Qwen3Args
from models.qwen3.flavors import FLAVORS
from models.qwen3.model import Qwen3Transformer
from models.qwen3.parallel import qwen3_tp_plan

FAMILY = dense_family(name="qwen3", args=Qwen3Args, model=Qwen3Transformer, flavors=FLAVORS, hf=hf, tp_plan=qwen3_tp_plan)
