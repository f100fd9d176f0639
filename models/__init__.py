"""Model families, one folder each, and their registry: one line per family below.

A shape (a family's args dataclass) names its family; everything the rest of the code asks of a family
(its modules, flavors, HF translation, TP plan, pipeline split, init, FLOPs, activation memory, adapter
targets) comes from its ModelFamily entry, and the model it builds fits models.family.Decoder. Nothing
here imports the trainer.
"""

import json

import torch

from models import llama, qwen3, qwen3_moe
from models.common.args import DecoderArgs
from models.family import Decoder, ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (llama.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY)}


def family_of(args: DecoderArgs) -> ModelFamily:
    return FAMILIES[args.family]


def family_for_hf(model_type: str) -> ModelFamily | None:
    """The family of a Hugging Face config's model_type, or None."""
    return next((f for f in FAMILIES.values() if f.hf.model_type == model_type), None)


def find_flavor(name: str) -> tuple[ModelFamily, dict] | None:
    """(its family, its fields) for a flavor name, or None."""
    return next(((f, f.flavors[name]) for f in FAMILIES.values() if name in f.flavors), None)


def args_from_json(text: str) -> DecoderArgs:
    """The shape a checkpoint carries (DecoderArgs.to_json). Checkpoints from before families had args of
    their own name no family for Llama and carry shared fields, which each family's from_fields takes."""
    fields = json.loads(text)
    name = fields.pop("family", "llama")
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not one we train ({', '.join(FAMILIES)})")
    return FAMILIES[name].args.from_fields(fields)


def build_meta_model(args: DecoderArgs) -> Decoder:
    """The model of args' family, on the meta device: it costs nothing and allocates nothing."""
    with torch.device("meta"):
        return family_of(args).model(args)


__all__ = ["FAMILIES", "Decoder", "DecoderArgs", "ModelFamily", "args_from_json", "build_meta_model", "family_for_hf",
           "family_of", "find_flavor"]
