"""Everything a run needs to resume, as torch.distributed.checkpoint `Stateful` objects.

Model and optimizer states are DTensor shards keyed by parameter name (optimizer state flattened per
name), so DCP can load them into any layout. The data position is merged over the data-parallel ranks
before saving, so any later layout finds every stream in it. Non-tensor values are plain numbers,
strings and lists only, which is what lets SafeLoadPlanner load them with weights_only=True.
"""

import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from trainer.data.loader import PackedLoader
from trainer.optimizer import Optimizers

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _plain(value):
    """The high-precision tensor inside a weight wrapper (torchao's float8 all-gather weight): checkpoints
    hold plain tensors, so that they load with float8 off and without torchao. The inner tensor shares
    the wrapper's storage, so a load into it lands in the parameter. Other subclasses (NF4's several
    inner tensors) are left as they are."""
    local = value.to_local() if isinstance(value, DTensor) else value
    if type(local) in (torch.Tensor, nn.Parameter) or not hasattr(local, "__tensor_flatten__"):
        return value
    names, _ = local.__tensor_flatten__()
    inner = getattr(local, names[0]) if len(names) == 1 else None
    if inner is None or type(inner) is not torch.Tensor or inner.shape != local.shape:
        return value
    if isinstance(value, DTensor):
        return DTensor.from_local(inner, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                                  stride=value.stride())
    return inner


class ModelState(Stateful):
    """The model's tensors: all of them, or only the trainable ones (adapter runs: the frozen base
    comes from model.init_from on every start, so checkpoints hold the small adapters alone)."""

    def __init__(self, parts: list[nn.Module], select: str = "all"):
        self.parts, self.select = parts, select

    def _names(self, part: nn.Module) -> set[str]:
        if self.select == "all":
            return set(get_model_state_dict(part))
        return {n for n, p in part.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        merged = {}
        for part in self.parts:  # pipeline stages hold disjoint parameter names
            names = self._names(part)
            merged.update({k: _plain(v) for k, v in get_model_state_dict(part).items() if k in names})
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts:
            own = {k: state[k] for k in self._names(part)}
            set_model_state_dict(part, own, options=StateDictOptions(strict=self.select == "all"))


class OptimizerState(Stateful):
    def __init__(self, optimizers: Optimizers):
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        merged = {}
        for part, opt in zip(self.optimizers.parts, self.optimizers.optimizers):
            merged.update({k: _plain(v) for k, v in get_optimizer_state_dict(part, opt, options=_FLAT).items()})
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part, opt in zip(self.optimizers.parts, self.optimizers.optimizers):
            own = get_optimizer_state_dict(part, opt, options=_FLAT).keys()
            set_optimizer_state_dict(part, opt, {k: state[k] for k in own}, options=_FLAT)


class SchedulerState(Stateful):
    def __init__(self, optimizers: Optimizers):
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        state = self.optimizers.schedulers[0].state_dict()  # every part's schedule is the same
        return {"last_epoch": state["last_epoch"], "last_lr": list(state["_last_lr"])}

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.optimizers.schedulers:
            scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": state["last_epoch"], "_last_lr": state["last_lr"]})


class DataState(Stateful):
    def __init__(self, loader: PackedLoader, dp_group):
        self.loader, self.dp_group = loader, dp_group

    def state_dict(self) -> dict:
        local = self.loader.state_dict()
        states = [local]
        if self.dp_group is not None:
            states = [None] * dist.get_world_size(self.dp_group)
            dist.all_gather_object(states, local, group=self.dp_group)
        merged = {"windows_consumed": local["windows_consumed"], "streams": {}}
        for state in states:
            merged["streams"].update(state["streams"])
        return {"json": json.dumps(merged, sort_keys=True)}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(json.loads(state["json"]))


class CounterState(Stateful):
    """Training progress that lives outside the model: the step and the tokens seen."""

    def __init__(self):
        self.step = 0
        self.tokens = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


class RngState(Stateful):
    def state_dict(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
