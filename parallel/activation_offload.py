"""Activation offloading: what a block saves for its backward goes to host memory during the forward and
comes back when the backward needs it (torch's saved-tensor hooks).

Every block but the last of a model part is wrapped in place (as activation checkpointing wraps it, no
wrapper module): the last block's activations are the first the backward reads, so moving them out and
straight back would only cost. Parameters are never moved (they are saved by reference, and FSDP manages
its gathered copies), nor are small tensors, whose copies cost more in latency than they free, nor
tensor subclasses other than DTensor (float8 or NF4 weights); a DTensor (tensor parallelism) moves its
local shard.

With checkpointed blocks (activation_checkpoint.mode full / selective_layer) a block saves only its
input, so its input is what moves; with selective_op the outputs it keeps stay on the device (the
checkpoint holds them outside autograd's saved tensors, where no hook reaches).

On CUDA the copy to pinned host memory runs on a side stream, overlapping the forward's compute; the
copy back is queued on the compute stream behind it. On CPU the "host" is the same memory: the tensor
is copied into a fresh host buffer, a correctness path for the hooks (memory does not drop).
"""

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# Below this many bytes a tensor stays where it is (a transfer's fixed cost outweighs the memory).
MIN_BYTES = 1 << 14


class HostOffload:
    """The pack / unpack pair; counts the bytes it moved (reset by the trainer each step, for the log)."""

    def __init__(self):
        self.stream = None
        self.bytes_moved = 0
        # While a block runs forward: the tensors moved so far and their copies, by storage and layout. One
        # tensor is often saved by several ops (the normalized input by the q, k and v projections): it
        # moves once.
        self.moved: dict | None = None

    def pack(self, t: torch.Tensor):
        base = t.to_local() if isinstance(t, DTensor) else t
        if self.moved is None or type(base) is not torch.Tensor:
            return self._pack(t)
        key = (base.untyped_storage().data_ptr(), base.storage_offset(), tuple(base.shape), tuple(base.stride()),
               base._version, getattr(t, "placements", None))
        if key not in self.moved:
            # t is kept with its copy until the block's forward ends: freed earlier, its memory could be
            # reused by another tensor of the same shape, which this key would then mistake for it.
            self.moved[key] = (t, self._pack(t))
        return self.moved[key][1]

    def _pack(self, t: torch.Tensor):
        if isinstance(t, DTensor):  # tensor parallelism: its local shard moves
            inner = t.to_local()
            local = self._pack(inner)
            return t if local is inner else (local, t.device_mesh, t.placements, t.shape, t.stride())
        if isinstance(t, nn.Parameter) or type(t) is not torch.Tensor or t.numel() * t.element_size() < MIN_BYTES:
            return t  # tensor subclasses (float8, NF4 weights) stay as they are
        if not _dense(t):
            return t  # an expanded or overlapping view: a copy would not keep its strides
        self.bytes_moved += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return t.device, torch.empty_like(t).copy_(t)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written before it is copied
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its device memory is not reused until the copy is done
        return t.device, host

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        if len(packed) == 5:
            local, mesh, placements, shape, stride = packed
            return DTensor.from_local(self.unpack(local), mesh, placements, run_check=False, shape=shape, stride=stride)
        device, host = packed
        if device.type != "cuda":
            return host
        torch.cuda.current_stream().wait_stream(self.stream)  # the copy out is finished before the copy back
        return host.to(device, non_blocking=True)


def _dense(t: torch.Tensor) -> bool:
    """Whether a copy made by empty_like keeps t's strides (it does for dense, non-overlapping layouts): the
    copy that comes back must be laid out as the tensor autograd saved, a DTensor's local shard above all,
    whose global strides are restored with it."""
    return torch.empty_like(t, device="meta").stride() == t.stride()


def _offload_forward(block: nn.Module, hooks: HostOffload) -> None:
    inner = block.forward

    def forward(*args, **kwargs):
        hooks.moved = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return inner(*args, **kwargs)
        finally:
            hooks.moved = None  # the copies now belong to autograd, freed as the backward uses them

    block.forward = forward


def apply_activation_offload(model: nn.Module) -> HostOffload:
    """Wraps every block but the last; returns the hooks (their byte count is per model part)."""
    hooks = HostOffload()
    for block in list(model.layers.values())[:-1]:
        _offload_forward(block, hooks)
    return hooks
