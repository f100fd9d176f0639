"""The Llama family (Llama 2 and 3): its registry entry. Dense blocks, so most answers are the shared
dense ones (models/common/dense.py)."""

from models.family import dense_family
from models.llama import hf
from models.llama.args import LlamaArgs
from models.llama.flavors import FLAVORS
from models.llama.model import LlamaTransformer

FAMILY = dense_family(name="llama", args=LlamaArgs, model=LlamaTransformer, flavors=FLAVORS, hf=hf)
