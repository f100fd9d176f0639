"""AdamW over the trainable parameters (moments in float32, bfloat16, 8 or 4 bits), the warmup + decay
schedule, and gradient clipping.

With pipeline parallelism a rank holds one or more model parts (stages); each gets its own optimizer and
schedule, because DCP's state-dict helpers map one optimizer to one module. They step together.
"""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from trainer.bf16_adamw import AdamWBF16States
from trainer.config.schema import Config, LRSchedulerConfig, OptimizerConfig
from trainer.optimizer_offload import HostMirror


def _groups(params: list[torch.Tensor], cfg: OptimizerConfig) -> list[dict]:
    """The trainable parameters in groups: decayed or not, and by mesh."""
    # Norm gains (1-D) are not decayed: decay would pull them toward zero, not toward simplicity. Parameters
    # on different meshes (expert parallelism's experts beside the rest) go to groups of their own: the
    # foreach and fused kernels take one group's tensors in one call, which DTensor allows on one mesh only.
    groups = [{"params": same_mesh, "weight_decay": cfg.weight_decay if decayed else 0.0}
              for decayed in (True, False) for same_mesh in by_mesh([p for p in params if (p.ndim >= 2) == decayed])]
    # An empty group (LoRA trains no 1-D parameters) cannot be restored: DCP's optimizer state dict
    # locates each group by its first parameter.
    return [g for g in groups if g["params"]]


def _adamw(params: list[torch.Tensor], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    impl = cfg.implementation
    if impl == "auto":
        # Fused on CPU as well: one pass over each tensor, no temporaries. foreach allocated a whole
        # model's worth of them every step: 1.66 s vs 0.20 s per step, and 0.7 GiB more peak memory, for
        # 207M parameters on the 2-core benchmark machine (docs/performance.md).
        impl = "fused" if device.type in _get_fused_kernels_supported_devices() else "foreach"
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return torch.optim.AdamW(_groups(params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


def _adamw_bf16(params: list[torch.Tensor], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return AdamWBF16States(_groups(params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _torchao(name: str):
    """torchao's AdamW with 8-bit or 4-bit block-quantized moments (blocks of 256 and 128 values, one
    float32 scale each; tensors under 4,096 values keep float32 moments). Chosen over bitsandbytes'
    8-bit AdamW, which matches it in accuracy (docs/memory.md), because torchao's states are tensor
    subclasses that FSDP2 and TP shard as DTensors, and it also has a 4-bit variant.

    torchao compiles its per-parameter step. That pays on a GPU; on CPU the first step compiles for tens of
    seconds, so there it runs eagerly unless optimizer.compile_step says otherwise."""

    def build(params: list[torch.Tensor], cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
        import torchao.optim

        base = getattr(torchao.optim, name)
        compiled = cfg.compile_step == "always" or (cfg.compile_step == "auto" and device.type == "cuda")
        cls = base if compiled else _eager_step(base)
        return cls(_groups(params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    return build


def _eager_step(base: type) -> type:
    class Eager(base):
        def step(self, closure=None):
            # force_eager makes the torch.compile call inside torchao's step run its function as it is.
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    Eager.__name__ = base.__name__
    return Eager


# optimizer.name -> the optimizer of one model part's trainable parameters (the config's choices come from here);
# `device`: where the parameters are.
OPTIMIZERS = {
    "adamw": _adamw,
    "adamw_bf16": _adamw_bf16,
    "adamw_8bit": _torchao("AdamW8bit"),
    "adamw_4bit": _torchao("AdamW4bit"),
}
# Bytes of optimizer state per trainable value, for the memory estimate; quantized moments add one float32
# scale per block and keep float32 moments for tensors too small to quantize (see state_bytes).
STATE_BYTES = {"adamw": 8.0, "adamw_bf16": 4.0, "adamw_8bit": 2.0, "adamw_4bit": 1.0}
MOMENTS = {"adamw": "fp32", "adamw_bf16": "bf16 moments", "adamw_8bit": "8-bit moments",
           "adamw_4bit": "4-bit moments"}
QUANTIZED_BLOCK = {"adamw_8bit": 256, "adamw_4bit": 128}


def state_bytes(name: str, numels: list[float]) -> float:
    """Optimizer state of tensors with these (per-rank) sizes: quantized moments for tensors of at least
    4,096 values that split into whole blocks, float32 for the rest (torchao's rule)."""
    block = QUANTIZED_BLOCK.get(name)
    if block is None:
        return STATE_BYTES[name] * sum(numels)
    quantized = [n for n in numels if n >= 4096]
    return (STATE_BYTES[name] + 2 * 4 / block) * sum(quantized) + 8 * (sum(numels) - sum(quantized))


def lr_lambda(cfg: LRSchedulerConfig, total_steps: int):
    """Multiplier of the base lr at a step: linear warmup, then cosine / linear / no decay to min_lr_ratio."""
    warmup = min(cfg.warmup_steps, total_steps)

    def factor(step: int) -> float:
        # LambdaLR calls this with 0 before the first step; steps are counted from 1 in the loop.
        step += 1
        if step <= warmup:
            return step / (warmup + 1)
        progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
        if cfg.decay_type == "constant":
            decay = 1.0
        elif cfg.decay_type == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return factor


def schedule_change(before: Config, now: Config, step: int) -> str | None:
    """A line saying how a resume's new training.steps / lr_scheduler / optimizer.lr moves the learning rate
    (the schedule is a function of them, so a resume re-stretches it), or None when nothing changed."""
    keys = [("training.steps", before.training.steps, now.training.steps), ("optimizer.lr", before.optimizer.lr, now.optimizer.lr)]
    keys += [(f"lr_scheduler.{k}", v, getattr(now.lr_scheduler, k)) for k, v in vars(before.lr_scheduler).items()]
    changed = [f"{k} {a} -> {b}" for k, a, b in keys if a != b]
    if not changed:
        return None
    then = before.optimizer.lr * lr_lambda(before.lr_scheduler, before.training.steps)(step)
    after = now.optimizer.lr * lr_lambda(now.lr_scheduler, now.training.steps)(step)
    return (f"note: the learning-rate schedule changed since the last start ({', '.join(changed)}): step {step + 1} trains "
            f"at lr {after:.3e} where the earlier schedule gave {then:.3e}, and the schedule now ends at step "
            f"{now.training.steps}")


class Optimizers:
    """An optimizer and an LR schedule per model part, stepped together. With optimizer.offload=cpu each
    part's optimizer steps host copies of its parameters (`mirrors`, trainer/optimizer_offload.py)."""

    def __init__(self, parts: list[nn.Module], cfg: OptimizerConfig, sched: LRSchedulerConfig, total_steps: int, device):
        self.parts = parts
        trained = [[p for p in part.parameters() if p.requires_grad] for part in parts]
        if cfg.offload == "cpu":
            self.mirrors = [HostMirror(part) for part in parts]
            self.optimizers = [OPTIMIZERS[cfg.name](m.host_params, cfg, torch.device("cpu")) for m in self.mirrors]
        else:
            self.mirrors = [None] * len(parts)
            self.optimizers = [OPTIMIZERS[cfg.name](params, cfg, device) for params in trained]
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched, total_steps)) for opt in self.optimizers
        ]

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return float(self.schedulers[0].get_last_lr()[0])  # torchao's optimizers keep lr as a tensor

    def zero_grad(self) -> None:
        for opt, mirror in zip(self.optimizers, self.mirrors):
            if mirror is not None:
                mirror.zero_device_grads()  # the host's gradient buffers are overwritten each step
            else:
                opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt, scheduler, mirror in zip(self.optimizers, self.schedulers, self.mirrors):
            if mirror is not None:
                mirror.gradients_to_host()
            opt.step()
            if mirror is not None:
                mirror.parameters_to_device()
            scheduler.step()


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None) -> torch.Tensor:
    """The global L2 norm of all gradients (over every shard and stage), clipping them to max_norm when > 0.

    Under FSDP2 / TP the gradients are DTensor shards: the norm of the shards is a partial result that
    full_tensor() reduces across the mesh. Pipeline stages hold different parameters, so their squared
    norms are summed over the pipeline group. Every rank then clips by the same, global, norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    groups = by_mesh(grads) or [[]]  # one norm per mesh (DTensor reduces each over its own), then their squares summed
    norms = [torch.nn.utils.get_total_norm(group, norm_type=2.0) for group in groups]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    norm = norms[0] if len(norms) == 1 else torch.stack([n**2 for n in norms]).sum().sqrt()
    if pp_group is not None:
        squared = norm**2
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    if max_norm > 0:
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm


def by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` split by the DeviceMesh of each (plain tensors together), in order of first appearance."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())
