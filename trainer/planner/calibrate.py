"""`--calibrate`: measure this machine's rates into a device profile (devices.py) for the planner. Matmul
FLOP/s by size and precision (CPU: at each thread count a rank may get), the memory bandwidth elementwise
kernels stream at, and each collective's latency and bus bandwidth over real processes with the backend a
run would use (gloo on CPU, NCCL on GPUs), fitted as latency + bytes / bandwidth. Every figure is the best of
a few trials: a busy moment only ever makes a trial slower.
"""

import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.cpu_threads import usable_cores
from trainer.planner.devices import COLLECTIVES, DeviceProfile, Link

MATMUL_SIZES = (128, 256, 512, 1024, 2048)
COLLECTIVE_BYTES = (2**16, 2**20, 2**22, 2**24)


def _best_seconds(fn, trials: int, sync) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(trials):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_curve(device: torch.device, dtype: torch.dtype, sizes=MATMUL_SIZES, trials: int = 3) -> list[tuple[float, float]]:
    """[(n, FLOP/s of an n x n x n matmul)]."""
    generator = torch.Generator(device=device).manual_seed(0)
    points = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        repeats = max(1, int(2e8 // n**3))  # each trial long enough to time
        seconds = _best_seconds(lambda: [a @ b for _ in range(repeats)], trials, _sync(device))
        points.append((float(n), 2 * n**3 * repeats / seconds))
    return points


def memory_bandwidth(device: torch.device, trials: int = 3) -> float:
    """Bytes per second of an add over tensors far larger than any cache (two read, one written)."""
    n = 2**26 if device.type == "cuda" else 2**24
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    out = torch.empty_like(a)
    seconds = _best_seconds(lambda: torch.add(a, b, out=out), trials, _sync(device))
    return 3 * 4 * n / seconds


def float8_speedup(device: torch.device) -> float:
    """A float8 linear layer's forward + backward against the compute dtype's (torchao; emulated on CPU,
    where it is slower, not faster). 0 where torchao is missing."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 2048 if device.type == "cuda" else 512
    x = torch.randn(2 * n, n, device=device, dtype=dtype, requires_grad=True)
    plain = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(device, dtype)
    converted = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(device, dtype)
    convert_to_float8_training(converted, config=Float8LinearConfig(emulate=device.type != "cuda"))
    times = [_best_seconds(lambda m=m: m(x).sum().backward(), 3, _sync(device)) for m in (plain, converted)]
    return times[0] / times[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    sync = _sync(device)
    rows = []
    for nbytes in COLLECTIVE_BYTES:
        n = nbytes // 4
        full = torch.ones(n, device=device)
        shard = torch.ones(n // world, device=device)
        calls = {
            "all_reduce": (lambda: dist.all_reduce(full), 2 * nbytes * (world - 1) / world),
            "all_gather": (lambda: dist.all_gather_into_tensor(full, shard), nbytes * (world - 1) / world),
            "reduce_scatter": (lambda: dist.reduce_scatter_tensor(shard, full), nbytes * (world - 1) / world),
            "all_to_all": (lambda: dist.all_to_all_single(torch.empty_like(full), full), nbytes * (world - 1) / world),
            # Rank 0 and 1 swap a buffer both ways, as neighbouring pipeline stages do.
            "send_recv": (lambda: _exchange(full, rank), nbytes),
        }
        for name, (fn, bus_bytes) in calls.items():
            times = []
            for _ in range(4):
                dist.barrier()
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
            rows.append((name, bus_bytes, min(times[1:])))
    if rank == 0:
        with open(os.path.join(out_dir, "collectives.txt"), "w") as f:
            f.writelines(f"{name} {b} {s}\n" for name, b, s in rows)
    dist.destroy_process_group()


def _exchange(buffer: torch.Tensor, rank: int) -> None:
    peer = 1 - rank if rank < 2 else rank
    if peer == rank:
        return
    recv = torch.empty_like(buffer)
    ops = [dist.P2POp(dist.isend, buffer, peer), dist.P2POp(dist.irecv, recv, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def fit_link(points: list[tuple[float, float]]) -> Link:
    """Least squares of seconds = latency + bus_bytes / bandwidth (latency at least zero)."""
    xs, ys = [b for b, _ in points], [s for _, s in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-15)
    return Link(latency_s=max(0.0, my - slope * mx), bus_bytes_per_s=1 / slope)


def measure_collectives(backend: str, world: int) -> dict[str, Link]:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_collective_worker, args=(world, _free_port(), backend, out), nprocs=world,
                           start_method="spawn")
        points: dict[str, list] = {}
        with open(os.path.join(out, "collectives.txt")) as f:
            for line in f:
                name, nbytes, seconds = line.split()
                points.setdefault(name, []).append((float(nbytes), float(seconds)))
    return {name: fit_link(points[name]) for name in COLLECTIVES}


def overlap_share(device: torch.device) -> float:
    """How much of a gradient-sized all-reduce hides under a matmul running meanwhile, on one process with
    a group of one (the cost of sharing the cores: CPU collectives copy on the cores that compute). Measured
    as (compute alone + copy alone - both together) / the shorter."""
    if device.type == "cuda":
        return 0.9  # NCCL runs on its own stream and SMs; FSDP2 prefetches (torchtitan's traces)
    n = 512
    a = torch.randn(n, n)
    big = torch.ones(2**24)
    mm = lambda: [a @ a for _ in range(20)]  # noqa: E731
    copy = lambda: big.mul_(1.0)  # noqa: E731
    t_mm = _best_seconds(mm, 3, lambda: None)
    t_copy = _best_seconds(copy, 3, lambda: None)
    import threading

    def both():
        thread = threading.Thread(target=lambda: [copy() for _ in range(max(1, round(t_mm / t_copy)))])
        thread.start()
        mm()
        thread.join()

    t_both = _best_seconds(both, 3, lambda: None)
    copies = max(1, round(t_mm / t_copy)) * t_copy
    return max(0.0, min(1.0, (t_mm + copies - t_both) / min(t_mm, copies)))


def process_bytes() -> float:
    """This process's resident memory now: the interpreter and the libraries a rank imports, which no
    estimate of training memory counts."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0.0


def calibrate(name: str = "this machine", collectives: bool = True) -> DeviceProfile:
    """This machine's profile: its first GPU where there is one, else its CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        matmul = {str(dtype).removeprefix("torch."): matmul_curve(device, dtype, sizes=(256, 512, 1024, 2048, 4096, 8192))
                  for dtype in (torch.bfloat16, torch.float32)}
        props = torch.cuda.get_device_properties(0)
        world = min(torch.cuda.device_count(), 8)
        links = measure_collectives("nccl", world) if collectives and world > 1 else {}
        memory, cores, per_node = props.total_memory, 0, torch.cuda.device_count()
        name = props.name if name == "this machine" else name
    else:
        device = torch.device("cpu")
        cores, _ = usable_cores()
        threads = sorted({1, *[2**i for i in range(1, cores.bit_length()) if 2**i <= cores], cores})
        matmul = {}
        for count in threads:
            torch.set_num_threads(count)
            for dtype in (torch.float32, torch.bfloat16):
                sizes = MATMUL_SIZES if dtype == torch.float32 else MATMUL_SIZES[:-1]
                matmul[f"{str(dtype).removeprefix('torch.')}@{count}"] = matmul_curve(device, dtype, sizes=sizes)
        torch.set_num_threads(cores)
        links = measure_collectives("gloo", 2) if collectives else {}
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        per_node = cores  # a CPU rank takes at least a core
    if not links:  # one device: nothing to measure; a slow placeholder that layouts over several never win with
        links = {c: Link(1e-3, 1e9) for c in COLLECTIVES}
    peaks: dict[str, float] = {}
    for key, points in matmul.items():  # the best any size and thread count reached
        dtype = key.split("@")[0]
        peaks[dtype] = max(peaks.get(dtype, 0.0), *(f for _, f in points))
    notes = [f"calibrated {time.strftime('%Y-%m-%d')} on {socket.gethostname()}",
             "between nodes: the same rates as inside one (one host cannot measure a network)"]
    return DeviceProfile(name=name, kind=device.type if device.type == "cpu" else "gpu", memory_bytes=float(memory),
                         peak_flops=peaks, matmul=matmul, memory_bytes_per_s=memory_bandwidth(device), intra=links,
                         inter=links, devices_per_node=per_node, overlap=overlap_share(device),
                         float8_speedup=float8_speedup(device), cores=cores, process_bytes=process_bytes(),
                         source="calibrated", notes=notes)
