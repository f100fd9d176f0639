"""optimizer.offload=cpu: the optimizer's state and its step in host memory; the device keeps the
parameters and their gradients (ZeRO-Offload's split).

The host holds a float32 copy of every trained parameter shard and a gradient buffer beside it; the
optimizer (any optimizer.name but the quantized ones) is built over those copies. A step copies each
gradient shard to the host after clipping, steps there, and copies the new values back into the device
shards. The device is spared the optimizer state (8 bytes per trained parameter with adamw, 4 with
adamw_bf16); the host holds it plus 8 bytes per parameter of copies.

Everything AdamW does is elementwise, so the host works on each rank's local shards (the local tensors
of FSDP2's and TP's DTensors) as plain tensors. Checkpoints name the state by parameter exactly as DCP's
flattened optimizer state dict does, each state in its parameter's DTensor layout: an offloaded run and a
plain one resume each other's checkpoints, on any layout.

On CUDA the copies go through pinned host memory, all gradients' copies queued before one wait (the
copies do not overlap the backward yet: with clipping and gradient accumulation, a gradient is final only
after the backward). On CPU the host is the same memory: the copies cost memory rather than free it, a
correctness path for the code.
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _in_layout(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A host tensor in `like`'s DTensor layout without moving it to the mesh's device (from_local would):
    how FSDP2 itself holds CPU-offloaded shards."""
    if not isinstance(like, DTensor):
        return local
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    spec = DTensorSpec(like.device_mesh, like.placements, TensorMeta(like.shape, like.stride(), local.dtype))
    return DTensor(local, spec, requires_grad=False)


class HostMirror:
    """Host copies of one model part's trained parameter shards, and the copies both ways."""

    def __init__(self, part: nn.Module):
        pin = torch.cuda.is_available()
        self.names: dict[torch.Tensor, str] = {}  # host copy -> parameter name (for checkpoints)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device parameter, host copy)
        for name, p in part.named_parameters():
            if not p.requires_grad:
                continue
            local = _local(p).detach()
            host = torch.empty(local.shape, dtype=torch.float32, pin_memory=pin)
            host.copy_(local)
            host.grad = torch.empty_like(host, pin_memory=pin)
            self.names[host] = name
            self.pairs.append((p, host))
        self.stale = False  # a checkpoint restored the device parameters: the host copies follow at the next step

    @property
    def host_params(self) -> list[torch.Tensor]:
        return [host for _, host in self.pairs]

    def gradients_to_host(self) -> None:
        if self.stale:
            self.parameters_from_device()
            self.stale = False
        for p, host in self.pairs:
            if p.grad is not None:
                host.grad.copy_(_local(p.grad), non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def parameters_to_device(self) -> None:
        with torch.no_grad():
            for p, host in self.pairs:
                _local(p).copy_(host, non_blocking=True)

    def parameters_from_device(self) -> None:
        for p, host in self.pairs:
            host.copy_(_local(p).detach())

    def zero_device_grads(self) -> None:
        for p, _ in self.pairs:
            p.grad = None

    # ---- checkpoints: DCP's flattened optimizer keys, states in their parameter's layout -----------

    def state_dict(self, opt: torch.optim.Optimizer) -> dict:
        if not opt.state:  # as DCP's helpers do: a step at lr 0 with zero gradients creates the state
            for host in self.host_params:
                host.grad.zero_()
            lrs = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                group["lr"] = 0.0
            opt.step()
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr
        device = {host: p for p, host in self.pairs}
        out = {}
        for host, state in opt.state.items():
            name = self.names[host]
            for key, value in state.items():
                out[f"state.{name}.{key}"] = value if key == "step" else _in_layout(value, device[host])
        for group in opt.param_groups:
            for host in group["params"]:
                out.update({f"param_groups.{self.names[host]}.{k}": v for k, v in group.items() if k != "params"})
        return out

    def load_state_dict(self, opt: torch.optim.Optimizer, state: dict) -> None:
        for host, own in opt.state.items():
            name = self.names[host]
            for key, value in own.items():
                value.copy_(_local(state[f"state.{name}.{key}"]))
        for group in opt.param_groups:
            name = self.names[group["params"][0]]
            for k in group:
                value = state.get(f"param_groups.{name}.{k}")
                if k != "params" and value is not None:
                    group[k] = value.item() if torch.is_tensor(value) else value  # torchao keeps lr as a tensor
        self.stale = True  # the model's own entry restores the device parameters, before or after this one
