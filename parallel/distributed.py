"""Process-group setup from the launcher's environment: gloo on CPU, nccl on CUDA, chosen from what the machine has."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.cpu_threads import cpu_threads


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_threads: str = ""  # on CPU: the intra-op threads of each rank, and why that many

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime() -> Runtime:
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        threads = ""
    else:
        device = torch.device("cpu")
        count, why = cpu_threads(os.environ)
        torch.set_num_threads(count)
        threads = f"{count} per rank ({why})"
    if world_size > 1 and not dist.is_initialized():
        # CPU tensors (e.g. checkpoint metadata) still need gloo on a GPU machine.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        # torchrun's in-job restarts keep one rendezvous store, and torch 2.13's env:// hands every attempt
        # that store unprefixed: the restarted ranks would read the dead attempt's addresses (gloo: "connect
        # failed, connection refused"). Each attempt gets keys of its own.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"tessera/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device, cpu_threads=threads)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
