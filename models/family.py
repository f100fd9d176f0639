"""What a model family is to the rest of the code: one ModelFamily entry, and a model that fits the small
Decoder protocol. A family is a folder of its own under models/ (args, modules, flavors, HF translation,
TP plan) plus one line in models/__init__.py; docs/architecture.md has the steps."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from models.common.args import DecoderArgs
from models.common.kv_cache import KVCache
from parallel.tp import TPPlan


class Decoder(Protocol):
    """What the trainer, weights/, evaluation, generation and adapters use of a model. A pipeline stage
    sets the modules it does not hold to None."""

    args: DecoderArgs
    tok_embeddings: nn.Module | None
    layers: nn.ModuleDict  # blocks keyed by layer id: the FSDP, AC, compile and pipeline unit
    norm: nn.Module | None
    output: nn.Module | None
    project: bool  # False: forward returns the final hidden states (the loss projects them)

    attention_kernel: str  # "sdpa" or "flex": how document masks run (models/common/masking.py)
    context_parallel: object | None  # parallel/cp.py's ContextParallel, or None: whole sequences

    def __call__(self, tokens: torch.Tensor, cache: KVCache | None = None,
                 documents: torch.Tensor | None = None) -> torch.Tensor: ...
    def init_buffers(self) -> None: ...
    def head_weight(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class HFFormat:
    """The family's Hugging Face checkpoints: config.json both ways, and parameter names both ways."""

    model_type: str  # config.json's model_type
    args_from_config: Callable[[dict], DecoderArgs]  # ValueError for a shape the family cannot hold
    config: Callable[..., dict]  # (args, *, dtype, bos_id, eos_id) -> config.json
    to_hf: Callable[[str], str]  # our parameter name -> the Hugging Face one
    from_hf: Callable[[str], str | None]  # and back (None: a tensor we do not keep)
    # Tensors of ours that HF files hold as several (one per expert) or fused with another: an object with
    # claims(hf_name), sources(name, shape, available hf names), join(name, parts) and split(name, tensor)
    # (models/common/hf.py: StackedExperts). None: every tensor maps to one of the same shape.
    joined: object | None = None

    def hf_tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The (HF name, tensor) pairs one of our parameters is written as."""
        pieces = self.joined.split(name, tensor) if self.joined is not None else None
        return pieces if pieces is not None else [(self.to_hf(name), tensor)]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    args: type[DecoderArgs]
    model: type[nn.Module]  # model(args) on whatever device is current: a Decoder
    flavors: dict[str, dict]  # named shapes: the args' fields (vocab_size -1: the tokenizer's, padded)
    hf: HFFormat
    # (model or pipeline stage, loss_parallel=, styles=) -> its tensor-parallel plan
    tp_plan: Callable[..., TPPlan]
    # (meta model, pp_rank=, pp_size=, num_stages=) -> [(stage index, stage module)]
    split_stages: Callable[..., list]
    init_std: Callable[[str, DecoderArgs], float | None]  # a parameter's init std (None: ones)
    flops_per_token: Callable[[DecoderArgs, int], int]  # training FLOPs per token at a sequence length
    # (args, activation_checkpoint.mode, activation_checkpoint.every) -> elements a block saves per token
    activation_elements: Callable[[DecoderArgs, str, int], float]
    tp_sizes: Callable[[DecoderArgs], dict[str, int]]  # sizes tensor parallelism splits, by model.* name
    adapter_targets: dict[str, str]  # adapters.targets short names -> module-name patterns
    # (args, parallel dims) -> why this family's blocks cannot run in that layout, or None
    check_layout: Callable[..., str | None] = lambda args, dims: None


def dense_family(*, name: str, args, model, flavors: dict, hf, tp_plan=None) -> "ModelFamily":
    """The registry entry of a family of dense blocks: its own shape, modules, flavors, HF format (a module
    with NAMES, args_from_config and config) and TP plan; the dense answers for the rest."""
    from models.common import dense
    from models.common.dense_tp import dense_tp_plan
    from parallel.pp import split_stages

    return ModelFamily(
        name=name, args=args, model=model, flavors=flavors,
        hf=HFFormat(model_type=name, args_from_config=hf.args_from_config, config=hf.config, to_hf=hf.NAMES.to_hf,
                    from_hf=hf.NAMES.from_hf),
        tp_plan=tp_plan or dense_tp_plan, split_stages=split_stages, init_std=dense.init_std,
        flops_per_token=dense.flops_per_token, activation_elements=dense.activation_elements, tp_sizes=dense.tp_sizes,
        adapter_targets=dense.ADAPTER_TARGETS,
    )
