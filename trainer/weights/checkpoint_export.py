"""A Hugging Face export of one of our checkpoints, from any layout it was saved in (pipeline stages too).

    python -m trainer.weights.checkpoint_export CHECKPOINTS/step-N OUT_DIR [--dtype bfloat16]

One process on CPU reads the checkpoint one parameter at a time (DCP assembles each from the shards of
whatever ranks wrote it), so memory holds one parameter plus one output shard, never the whole model.
"""

import argparse
import sys
from pathlib import Path

import torch

from models import build_meta_model
from trainer.errors import UserError
from trainer.weights.dcp_import import DCPWeights, read_dcp_args
from trainer.weights.hf_export import write_hf


def export_checkpoint_hf(path: Path, out_dir: Path, dtype: torch.dtype, bos_id=None, eos_id=None) -> None:
    args = read_dcp_args(path)
    shapes = {name: p.shape for name, p in build_meta_model(args).named_parameters()}
    weights = DCPWeights(path, args, shapes)
    tensors = ((name, weights.get(name)) for name in shapes)
    write_hf(tensors, args, out_dir, dtype, bos_id=bos_id, eos_id=eos_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.weights.checkpoint_export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    try:
        export_checkpoint_hf(args.checkpoint, args.out_dir, getattr(torch, args.dtype))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"export: {args.out_dir}: Hugging Face checkpoint of {args.checkpoint} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
