"""`--check` against the machine it runs on: the devices a plan's ranks need and the memory the dry run's
estimate gives each of them, beside what this host has. The estimate is a lower bound (it leaves out the
Python process, the CUDA context and allocator slack), so a plan refused here cannot run here; one that
passes may still be tight.

On a GPU host each rank needs a GPU of its own with room for the device total, and the host holds
every rank's offloaded share; on a CPU host the "device" is host memory, so all of a rank's estimate
comes out of the host's available memory, for every rank started on it.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.dry_run import device_bytes, estimate_memory
from trainer.plan import Plan
from trainer.precision import Precision

GIB = 2**30


@dataclass(frozen=True)
class Machine:
    gpus: int
    gpu_bytes: int  # the smallest GPU's memory (0 without GPUs)
    gpu_name: str
    host_available: int  # MemAvailable: what new processes can have without swapping
    cores: int

    def describe(self) -> str:
        gpus = f"{self.gpus} x {self.gpu_name} ({self.gpu_bytes / GIB:.1f} GiB)" if self.gpus else "no GPU"
        return f"{gpus}, {self.cores} cores, {self.host_available / GIB:.1f} GiB of host memory available"


def _meminfo(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def this_machine() -> Machine:
    gpus = torch.cuda.device_count()
    sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(gpus)]
    available = _meminfo("MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Machine(gpus=gpus, gpu_bytes=min(sizes, default=0), gpu_name=torch.cuda.get_device_name(0) if gpus else "",
                   host_available=available, cores=len(os.sched_getaffinity(0)))


def fit_problems(plan: Plan, machine: Machine, ranks_here: int) -> list[str]:
    """Why the plan's `ranks_here` ranks on this host cannot run on it (empty: nothing found)."""
    cfg = plan.cfg
    device = torch.device("cuda" if machine.gpus else "cpu")
    precision = Precision.from_config(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, device)
    memory = estimate_memory(plan, precision)
    on_device = device_bytes(memory)
    offloaded = sum(memory.values()) - on_device
    problems = []
    if machine.gpus:
        if ranks_here > machine.gpus:
            problems.append(f"{ranks_here} rank(s) on this host need a GPU each; it has {machine.gpus}")
        if on_device > machine.gpu_bytes:
            problems.append(f"a rank needs about {on_device / GIB:.1f} GiB of GPU memory by the dry run's estimate; "
                            f"the GPUs here have {machine.gpu_bytes / GIB:.1f} GiB")
        host_need, host_what = ranks_here * offloaded, f"{ranks_here} x {offloaded / GIB:.1f} GiB offloaded"
    else:
        host_need = ranks_here * (on_device + offloaded)
        host_what = (f"{ranks_here} rank(s) x {(on_device + offloaded) / GIB:.1f} GiB, the device's share included: "
                     f"without a GPU it is host memory")
    if host_need > machine.host_available:
        problems.append(f"the ranks need about {host_need / GIB:.1f} GiB of host memory ({host_what}) by the dry run's "
                        f"estimate; {machine.host_available / GIB:.1f} GiB is available")
    return problems
