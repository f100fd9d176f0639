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

from trainer.checkpoint.quantized_moments import SCALES_INFIX, is_quantized, restore_, scales_key, to_checkpoint
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
    """Every part's optimizer state, flattened by parameter name. Block-quantized moments (adamw_8bit,
    adamw_4bit) are saved as float32 values plus each rank's block scales (trainer/checkpoint/
    quantized_moments.py), and quantized back into the live moments on load."""

    def __init__(self, optimizers: Optimizers):
        self.optimizers = optimizers
        self.saved_keys: set[str] | None = None  # before a load: the optimizer keys the checkpoint holds

    def loading_from(self, saved: dict) -> None:
        """Told before a load which entries the checkpoint holds (its metadata's keys, "optimizer." first):
        the block scales of this layout are asked for only if they are there."""
        self.saved_keys = {k.removeprefix("optimizer.") for k in saved}

    def state_dict(self) -> dict:
        merged = {}
        for part, opt, mirror in zip(self.optimizers.parts, self.optimizers.optimizers, self.optimizers.mirrors):
            flat = mirror.state_dict(opt) if mirror is not None else get_optimizer_state_dict(part, opt, options=_FLAT)
            for key, value in flat.items():
                if is_quantized(value):
                    merged.update(to_checkpoint(key, value))
                else:
                    merged[key] = _plain(value)
        if self.saved_keys is not None:
            # A load asks only for the block scales the checkpoint has (those of this layout), and for the
            # hyperparameters it has (another optimizer.name keeps other ones: they come from the config).
            merged = {k: v for k, v in merged.items() if k in self.saved_keys
                      or not (k.startswith("param_groups.") or SCALES_INFIX in k)}
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part, opt, mirror in zip(self.optimizers.parts, self.optimizers.optimizers, self.optimizers.mirrors):
            if mirror is not None:
                mirror.load_state_dict(opt, state)
                continue
            live = get_optimizer_state_dict(part, opt, options=_FLAT)
            # Quantized moments stay the live tensors through torch's load; their values are filled in after.
            set_optimizer_state_dict(part, opt, {k: _loaded(k, v, state) for k, v in live.items()}, options=_FLAT)
            for key, value in get_optimizer_state_dict(part, opt, options=_FLAT).items():
                if is_quantized(value):
                    restore_(value, state[key], state.get(scales_key(key, value)))
        self.saved_keys = None


def _loaded(key: str, live, state: dict):
    """What torch's load gets for one entry: the checkpoint's value, in the live value's kind (torchao keeps
    lr as a tensor), or the live value where the checkpoint has none (a hyperparameter of another optimizer)."""
    if is_quantized(live) or key not in state:
        return live
    value = state[key]
    if torch.is_tensor(live) != torch.is_tensor(value) and key.endswith(".lr"):
        return torch.tensor(value, dtype=live.dtype) if torch.is_tensor(live) else value.item()
    return value


class SchedulerState(Stateful):
    def __init__(self, optimizers: Optimizers):
        self.optimizers = optimizers

    def state_dict(self) -> dict:
        state = self.optimizers.schedulers[0].state_dict()  # every part's schedule is the same
        return {"last_epoch": state["last_epoch"], "last_lr": [float(lr) for lr in state["_last_lr"]]}

    def load_state_dict(self, state: dict) -> None:
        for scheduler in self.optimizers.schedulers:
            scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": state["last_epoch"], "_last_lr": state["last_lr"]})


class DataState(Stateful):
    def __init__(self, loader, dp_group):
        """`loader`: a PackedLoader (trainer/data), or one with its state_dict / load_state_dict."""
        self.loader, self.dp_group = loader, dp_group

    def state_dict(self) -> dict:
        local = self.loader.state_dict()
        states = [local]
        if self.dp_group is not None:
            states = [None] * dist.get_world_size(self.dp_group)
            dist.all_gather_object(states, local, group=self.dp_group)
        merged = {**local, "streams": {}}  # the counts are the same on every rank; the streams are each rank's own
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
