"""The teacher: any checkpoint model.init_from reads (ours, Hugging Face, llama2.c), of any registered
family, built on meta and materialized unit by unit like the student, sharded with FSDP2 over the same
ranks, frozen, in eval mode. It only runs forwards under no_grad, so it keeps no activations and each
unit is resharded right after its forward."""

import torch
from torch import nn

from models import DecoderArgs, build_meta_model
from parallel.mesh import ParallelDims
from parallel.parallelize import parallelize
from trainer.adapters.frozen import FrozenLinear
from trainer.adapters.quantize import bytes_per_layer, bytes_per_weight, check_4bit_setting
from trainer.config import ConfigError
from trainer.config.schema import DistillConfig
from trainer.precision import Precision
from trainer.weights.errors import CheckpointError
from trainer.weights.load import open_weights, read_checkpoint_args
from trainer.weights.materialize import materialize_unit


def check_teacher(cfg: DistillConfig, hqq_group_size: int, seq_len: int, dims: ParallelDims,
                  student: DecoderArgs) -> DecoderArgs | None:
    """The teacher's shape, once it is known to fit the run (None without distillation). Reads only the
    checkpoint's metadata."""
    path = cfg.teacher
    if path is None:
        return None
    if dims.pp > 1 or dims.tp > 1 or dims.cp > 1:
        raise ConfigError(
            f"distill.teacher runs with data parallelism (FSDP2, HSDP) only, not with parallel.pp={dims.pp} / "
            f"parallel.tp={dims.tp} / parallel.cp={dims.cp}: the teacher reads each microbatch's inputs beside the "
            f"student's logits. Set parallel.pp=1, parallel.tp=1 and parallel.cp=1 (shard the student and the teacher "
            f"with parallel.dp_shard)"
        )
    try:
        args = read_checkpoint_args(path)
    except CheckpointError as err:
        raise CheckpointError(str(err).replace("model.init_from", "distill.teacher")) from None
    if args.vocab_size != student.vocab_size:
        raise ConfigError(
            f"distill.teacher={path} has a vocabulary of {args.vocab_size} tokens and the student "
            f"{student.vocab_size}: teacher and student must share the tokenizer (the KL compares their "
            f"distributions token by token). Pick a teacher of this tokenizer, or set model.vocab_size to match "
            f"if the student's is only padded differently"
        )
    check_teacher_quantize(cfg.teacher_quantize, hqq_group_size, dims, args)
    if args.max_seq_len < seq_len:
        raise ConfigError(
            f"training.seq_len={seq_len} is over distill.teacher's maximum sequence length "
            f"{args.max_seq_len}: lower training.seq_len"
        )
    return args


def check_teacher_quantize(q: str, hqq_group_size: int, dims: ParallelDims, args: DecoderArgs) -> None:
    """A 4-bit teacher needs its library, and block linears that split into whole 4-bit blocks per FSDP
    shard (the same rules as a 4-bit adapter base)."""
    if q == "none":
        return
    meta = build_meta_model(args)
    check_4bit_setting("distill.teacher_quantize", q, {name: meta.get_submodule(name).weight.shape for name in _block_linears(meta)},
                       dims=dims, hqq_group_size=hqq_group_size,
                       fix="change parallel.dp_shard, or use another distill.teacher_quantize")


def _block_linears(model: nn.Module) -> list[str]:
    """The linear layers of the transformer blocks (embeddings and the head stay in the compute dtype)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]


def build_teacher(cfg: DistillConfig, args: DecoderArgs, *, hqq_group_size: int, fsdp_mesh, shards: int,
                  precision: Precision, device: torch.device, compile: bool = False, cpu_offload: bool = False) -> nn.Module:
    """`shards`: the FSDP shards of each weight (dp_shard; 1 without FSDP), which 4-bit NF4 blocks follow."""
    model = build_meta_model(args)
    weights = open_weights(cfg.teacher, args, seed=0, shapes={n: p.shape for n, p in model.named_parameters()})
    quantize = cfg.teacher_quantize
    if quantize != "none":
        for name in _block_linears(model):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FrozenLinear(model.get_submodule(name)))

    def materialize(unit: nn.Module, unit_name: str) -> None:
        # Stored in the compute dtype (a frozen model needs no float32 master copy), 4-bit if asked:
        # before FSDP shards the unit, since FSDP2 cannot change a parameter's dtype or type afterwards.
        for _, piece in materialize_unit(unit, unit_name, device=device, weights=weights):
            modules = list(piece.modules())  # before quantizing adds the codes' modules
            for module in modules:
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(param.detach().to(precision.param_dtype), requires_grad=False))
            for module in modules:
                if isinstance(module, FrozenLinear) and quantize != "none":
                    module.quantize_base(quantize, shards=shards, hqq_group_size=hqq_group_size)

    parallelize(
        model, tp_mesh=None, tp_plan=None, ac_mode="none", ac_every=1, compile=compile,
        fsdp_mesh=fsdp_mesh, param_dtype=precision.param_dtype, reduce_dtype=precision.reduce_dtype,
        reshard_after_forward="always", cpu_offload=cpu_offload, materialize=materialize,
    )
    return model.requires_grad_(False).eval()


def teacher_memory(args: DecoderArgs, cfg: DistillConfig, *, hqq_group_size: int, dp_shard: int, micro_tokens: int,
                   compute_bytes: int) -> dict[str, float]:
    """Bytes per rank the teacher adds, for --dry-run: its frozen weights in the compute dtype (block
    linears 4-bit with distill.teacher_quantize), sharded by FSDP; a gathered block and the prefetched
    next one; its logits for the microbatch; and the float32 working set of one chunk of the loss (both
    models' log-probabilities, their difference and the student's gradient). Its activations live for
    one layer at a time under no_grad: left out."""
    model = build_meta_model(args)
    params = sum(p.numel() for p in model.parameters())
    linears = sum(model.get_submodule(name).weight.numel() for name in _block_linears(model))
    block = sum(p.numel() for p in next(iter(model.layers.values())).parameters())
    block_linears = linears / len(model.layers)
    q = cfg.teacher_quantize
    if q == "none":
        stored, gathered, label = params * compute_bytes / dp_shard, block * compute_bytes, "compute dtype"
    else:
        sharded, whole = bytes_per_weight(q, hqq_group_size, compute_bytes)
        stored = ((params - linears) * compute_bytes / dp_shard + linears * (sharded / dp_shard + whole)
                  + len(_block_linears(model)) * bytes_per_layer(q))
        gathered = (block - block_linears) * compute_bytes + block_linears * (sharded + whole)
        label = f"block linears 4-bit {q}"
    chunk = min(cfg.chunk_tokens, micro_tokens)
    return {
        f"teacher parameters (frozen, {label})": stored,
        "teacher gathered parameters in flight": 2 * gathered if dp_shard > 1 else 0,
        "teacher logits": micro_tokens * args.vocab_size * compute_bytes,
        f"distillation loss, one chunk of {chunk} tokens (fp32)": 4 * chunk * args.vocab_size * 4,
    }
