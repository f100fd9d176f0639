"""Training a mixture of experts: what its routers need beyond the loss's own gradients, and what a user
watches of them.

- The load-balancing loss (the Switch Transformer's, as transformers computes it: over every MoE layer of
  a forward together; and over the tokens of all data-parallel ranks' microbatches of a step's round
  together, the global-batch balancing its published MoE models were trained with) enters through the
  backward, not the loss value: a forward hook on the model computes it from the layers' routing
  statistics and attaches its gradient to the model's output (_AttachAuxGrad). So the logged loss stays
  the cross-entropy, every loss (distillation's too) is untouched, and
  activation checkpointing's recompute, which reruns blocks and not the model, counts nothing twice.
- The expert bias of DeepSeek-V3-style routing moves toward even load after each optimizer step, from
  the step's choices per expert summed over every rank that routes tokens through the same layer.
- Per-layer expert load (most tokens on one expert over the mean), the auxiliary loss and the router's
  entropy go to the console and TensorBoard.

Scaling: each rank's probabilities are weighed by the choices and rows of every data- and
context-parallel rank's microbatch (an all-reduce in the forward), so the ranks' parts sum to the loss of
the whole round, value and gradient; one process with the round as one microbatch computes the same.
FSDP averages gradients over those ranks and a step has `accum` rounds, so each part's gradient weight
is coef x ranks / accum. Tensor-parallel ranks hold different tokens of a MoE layer too (each its slice
of the sequence) and their parts sum like the others', but their gradients are summed, not averaged.
"""

from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from models.common.moe import MoE, load_balancing_loss


class _AttachAuxGrad(torch.autograd.Function):
    """Identity on `out`; in the backward, d(weight x aux)/d(aux) = weight flows into the routers."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.weight, device=grad.device, dtype=torch.float32), None


class ExpertBalance:
    def __init__(self, parts: list[nn.Module], args, *, aux_loss_coef: float, bias_update_rate: float,
                 ranks: int = 1, pp: int = 1, device: torch.device | str = "cpu"):
        self.args, self.num_experts = args, args.num_experts
        self.coef, self.rate = aux_loss_coef, bias_update_rate
        # The data- and context-parallel ranks, whose gradients FSDP averages over.
        self.ranks = ranks
        # Every rank routes tokens of its own (tp ranks too: a MoE layer runs on their slices of the sequence),
        # so a round's choices and rows are summed over the world (the loss is refused with pipeline stages).
        self.reduce = dist.is_initialized() and dist.get_world_size() > 1
        # The loss spans every MoE layer of a forward: a pipeline stage sees only its own.
        self.whole_model = pp == 1
        # Each part's MoE layers by layer id: a part's hook reads its own only (a recompute of activation
        # checkpointing in another part's backward may have left statistics on that part's layers).
        self.part_layers: list[dict[int, MoE]] = [
            {int(i): block.moe for i, block in part.layers.items() if hasattr(block, "moe")} for part in parts]
        self.layers: dict[int, MoE] = {i: m for own in self.part_layers for i, m in own.items()}
        self.device = torch.device(device)
        self.scalars: dict[str, float] = {}
        self.accum, self.forwards = 1, 1
        self._reset()
        for index, part in enumerate(parts):
            part.register_forward_hook(partial(self._harvest, index))

    def _reset(self) -> None:
        # Per model part, per forward: (layers of the whole model, experts + 2) with each layer's choices per
        # expert, the router entropies summed over tokens and the tokens routed (zeros for the layers of
        # other parts). Kept on the device: nothing here waits for them until the step ends.
        self.records: dict[int, list[torch.Tensor]] = {}
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def start_step(self, accum: int, forwards: int | None = None) -> None:
        """`accum` microbatch rounds; `forwards`: the forwards each model part runs in the step (pipeline
        schedules run one per pipeline microbatch), by default one per round."""
        self.accum, self.forwards = accum, forwards or accum
        self._reset()

    def _harvest(self, index: int, module: nn.Module, inputs, out: torch.Tensor) -> torch.Tensor | None:
        """After each training forward of a model part: its MoE layers' statistics, and the auxiliary
        loss's gradient attached to its output."""
        if not (module.training and torch.is_grad_enabled()):
            return None
        held = [(i, m) for i, m in self.part_layers[index].items() if m.last_stats is not None]
        stats = [m.last_stats for _, m in held]
        record = torch.zeros(self.args.n_layers, self.num_experts + 2, dtype=torch.float64, device=self.device)
        for (i, m), s in zip(held, stats):
            record[i, : self.num_experts] = s.counts.detach()
            record[i, self.num_experts] = s.entropy_sum
            record[i, self.num_experts + 1] = s.tokens
            m.last_stats = None  # the probabilities' graph is the backward's to free
        self.records.setdefault(index, []).append(record)
        if not stats or not self.whole_model:
            return None
        counts = torch.stack([s.counts for s in stats]).sum(0).float()
        both = torch.cat([counts, counts.new_tensor([float(sum(s.tokens for s in stats))])])
        if self.reduce:  # the choices and rows of the whole round, in one reduction
            dist.all_reduce(both)
        aux = load_balancing_loss(stats, self.num_experts, counts=both[:-1], rows=both[-1])
        self.aux_sum += aux.detach()
        if self.coef == 0:
            return None
        return _AttachAuxGrad.apply(out, aux, self.coef * self.ranks / self.accum)

    @torch.no_grad()
    def after_step(self, applied: bool) -> None:
        """Once per step on every rank: the statistics summed over the ranks, the bias update (when the
        step's update was applied) and the scalars to log."""
        # A pipeline schedule's first step also runs each stage once on empty tensors to learn the shapes it
        # passes on: only the last `forwards` records of a part are the step's own.
        shape = (self.args.n_layers, self.num_experts + 2)
        loads = sum((r for records in self.records.values() for r in records[-self.forwards:]),
                    torch.zeros(shape, dtype=torch.float64, device=self.device))
        both = torch.cat([loads.flatten(), self.aux_sum.view(1)])
        if dist.is_initialized():
            dist.all_reduce(both)
        both = both.cpu()
        loads, aux = both[:-1].view(shape), both[-1]
        counts = loads[:, : self.num_experts]
        moe_layers = [i for i in range(self.args.n_layers) if self.args.is_moe_layer(i)]
        if applied and self.rate > 0:
            for i, layer in self.layers.items():
                # A frozen router (adapters over a base) keeps the base's bias too: checkpoints of such runs
                # hold only what trains.
                if layer.expert_bias is not None and layer.router.weight.requires_grad:
                    c = counts[i]
                    layer.expert_bias += (self.rate * torch.sign(c.mean() - c)).to(layer.expert_bias)
        ratio = {i: (counts[i].max() / counts[i].mean().clamp_min(1e-9)).item() for i in moe_layers}
        tokens = loads[moe_layers, self.num_experts + 1].sum().clamp_min(1)
        self.scalars = {
            "moe/load_max_over_mean": max(ratio.values()),
            "moe/router_entropy": (loads[moe_layers, self.num_experts].sum() / tokens).item(),
            **{f"moe/load_max_over_mean/layer_{i}": r for i, r in ratio.items()},
        }
        if self.whole_model:  # the ranks' parts summed: the mean over the step's rounds
            self.scalars["moe/aux_loss"] = aux.item() / self.accum


def expert_balance(plan, parts: list[nn.Module], device: torch.device) -> ExpertBalance | None:
    """The run's ExpertBalance, or None for a model without experts. Every rank has one when the model has
    experts, pipeline stages without MoE layers too: its step-end reduction is a collective."""
    args, cfg = plan.model_args, plan.cfg.moe
    if not hasattr(args, "num_experts"):
        return None
    coef = args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    return ExpertBalance(parts, args, aux_loss_coef=coef, bias_update_rate=cfg.bias_update_rate,
                         ranks=plan.dims.dp_size * plan.dims.cp, pp=plan.dims.pp, device=device)


def check_moe_settings(cfg, args, dims, compiled: bool = False) -> str | None:
    """Why the moe section, or a layout, cannot apply to this mixture of experts (None: it can)."""
    if not hasattr(args, "num_experts"):
        if cfg.aux_loss_coef:
            return f"moe.aux_loss_coef={cfg.aux_loss_coef} is set, but the {args.family} model has no experts: remove it"
        return None
    if compiled and dims.tp > 1:
        # Under tp a MoE layer turns the sequence-split DTensor into this rank's tokens and back; in a compiled
        # block with graph breaks around the experts, torch 2.13's DTensor backward fails or, worse, gives
        # wrong gradients (measured: a 0.04 loss difference with DeepSeek-V3-style routing).
        return (f"compile.enabled=true with parallel.tp={dims.tp} over a mixture of experts is not supported yet "
                f"(the compiled blocks' gradients are wrong): set compile.enabled=false, or use ep / dp_shard in "
                f"place of tp")
    coef = args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    if coef > 0 and dims.pp > 1:
        return (f"the load-balancing loss (coefficient {coef}) spans every MoE layer of a forward, which parallel.pp="
                f"{dims.pp} splits over stages: set moe.aux_loss_coef=0 (a model with an expert bias balances "
                f"without it), or parallel.pp=1")
    return None
