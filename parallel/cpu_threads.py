"""Intra-op threads of a CPU rank. More threads than free cores make every parallel region wait for its
slowest thread's turn on a core (OpenMP threads spin, then sleep): on the 2-core machine a debug step took
145 ms alone with 2 threads, 500 ms with 2 threads beside one busy process, 220 ms with 1 thread beside
it (docs/performance.md). So a rank takes the cores it may use (affinity, narrowed by a cgroup quota)
shared among the ranks on its host, and a single process leaves out the cores other work keeps busy
when it starts. OMP_NUM_THREADS, set by the user or a launcher (torchrun sets 1 for several ranks),
always wins. CPU matmuls give the same bits on any thread count, so the choice moves speed, not losses.
"""

import os
import time
from pathlib import Path


def usable_cores() -> tuple[int, str]:
    """The cores this process may run on: its CPU affinity (taskset, cpusets, Slurm), narrowed by a
    cgroup v2 CPU quota (a container's --cpus), which affinity does not show."""
    cores, where = len(os.sched_getaffinity(0)), "CPU affinity"
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max" and int(quota) // int(period) < cores:
            cores, where = max(1, int(quota) // int(period)), "cgroup CPU quota"
    except (OSError, ValueError):
        pass
    return cores, where


def _cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each CPU, from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_cores(cpus: set[int], seconds: float = 0.2) -> float:
    """How many of `cpus` other work keeps busy, measured over `seconds` while this process sleeps."""
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        total = after[cpu][1] - before[cpu][1]
        busy += (after[cpu][0] - before[cpu][0]) / total if total > 0 else 0.0
    return busy


def cpu_threads(env) -> tuple[int, str]:
    """(threads, why) for a CPU rank."""
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores, where = usable_cores()
    ranks = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if ranks > 1:  # the ranks start together: their own start-up would read as other work
        return max(1, cores // ranks), f"{cores} core(s) by {where} / {ranks} ranks on this host; OMP_NUM_THREADS overrides"
    busy = round(busy_cores(os.sched_getaffinity(0)))
    note = f", {busy} busy with other work at start-up" if busy else ""
    return max(1, cores - busy), f"{cores} core(s) by {where}{note}; OMP_NUM_THREADS overrides"
