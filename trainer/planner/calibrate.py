"""`--calibrate`: measure this machine's rates into a device profile (devices.py) for the planner. Matmul
FLOP/s by size and precision (CPU: at each thread count a rank may get), the memory bandwidth elementwise
kernels stream at, and each collective's latency and bus bandwidth over real processes with the backend a
run would use (gloo on CPU, NCCL on GPUs), fitted as latency + bytes / bandwidth. Every figure is the best of
a few trials' median (collectives: their fastest).
"""

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.cpu_threads import usable_cores
from trainer.planner.calibrate_layouts import layout_costs
from trainer.planner.devices import COLLECTIVES, DeviceProfile, Link
from trainer.planner import reference, timing
from trainer.planner.timing import synchronizer

MATMUL_SIZES = (128, 256, 512, 1024, 2048)
COLLECTIVE_BYTES = (2**16, 2**20, 2**22, 2**24)


def matmul_curve(device: torch.device, dtype: torch.dtype, sizes=MATMUL_SIZES, trials: int = 3) -> list[tuple[float, float]]:
    """[(n, FLOP/s)] of a linear layer's training products for an n x n weight and many more tokens than n
    (max(2048, 2n), as a block's projections have): the forward x @ W^T and backward's two, dy @ W and
    dy^T @ x (6 t n^2 FLOPs), through autograd as training runs them."""
    generator = torch.Generator(device=device).manual_seed(0)
    points = []
    for n in sizes:
        tokens = max(2048, 2 * n)
        x = torch.randn(tokens, n, device=device, dtype=dtype, generator=generator, requires_grad=True)
        w = torch.randn(n, n, device=device, dtype=dtype, generator=generator, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=dtype, generator=generator)
        repeats = max(1, int(2e8 // (tokens * n * n)))  # each trial long enough to time

        def step():
            for _ in range(repeats):
                x.grad = w.grad = None
                torch.nn.functional.linear(x, w).backward(dy)

        seconds = timing.seconds(step, trials, synchronizer(device))
        points.append((float(n), 6 * tokens * n * n * repeats / seconds))
    return points


def attention_curve(device: torch.device, dtype: torch.dtype, seqs, head_dim: int, trials: int = 3) -> list[tuple[float, float]]:
    """[(sequence length, FLOP/s)] of causal scaled dot product attention, forward and backward, counted as
    flops_per_token counts attention (12 x heads x head_dim x seq_len per token)."""
    import torch.nn.functional as F

    heads = 8
    points = []
    for seq in seqs:
        batch = max(1, 4096 // seq)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
        seconds = timing.seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad), trials,
                                synchronizer(device))
        points.append((float(seq), batch * seq * 12 * heads * head_dim * seq / seconds))
    return points


def elementwise_rate(device: torch.device, dtype: torch.dtype, trials: int = 3) -> float:
    """Bytes/s of a block's elementwise work as the time model counts it: an RMSNorm and SwiGLU's product,
    forward and backward, over tokens x (2 x dim + 4 x hidden) saved elements (norm input and output; the
    gate, up, silu and product), ELEMENTWISE_PASSES bytes-widths each."""
    from trainer.planner.estimate import ELEMENTWISE_PASSES

    tokens, dim, hidden = (16384, 4096, 14336) if device.type == "cuda" else (2048, 512, 1536)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    gain = torch.ones(dim, device=device, dtype=dtype, requires_grad=True)
    a, b = (torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(2))

    def step():
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
        product = torch.nn.functional.silu(a) * b
        (normed.sum() + product.sum()).backward()

    seconds = timing.seconds(step, trials, synchronizer(device))
    return ELEMENTWISE_PASSES * tokens * (2 * dim + 4 * hidden) * dtype.itemsize / seconds


def memory_bandwidth(device: torch.device, trials: int = 3) -> float:
    """Bytes per second of an add over tensors far larger than any cache (two read, one written)."""
    n = 2**26 if device.type == "cuda" else 2**24
    a, b = torch.ones(n, device=device), torch.ones(n, device=device)
    out = torch.empty_like(a)
    seconds = timing.seconds(lambda: torch.add(a, b, out=out), trials, synchronizer(device))
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
    x = torch.randn(max(2048, 2 * n), n, device=device, dtype=dtype, requires_grad=True)  # as matmul_curve's
    plain = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(device, dtype)
    converted = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(device, dtype)
    convert_to_float8_training(converted, config=Float8LinearConfig(emulate=device.type != "cuda"))
    times = [timing.seconds(lambda m=m: m(x).sum().backward(), 3, synchronizer(device)) for m in (plain, converted)]
    return times[0] / times[1]


def dequantize_rate(device: torch.device) -> float:
    """NF4 weights (torchao's, as adapters.quantize_base=nf4 stores them) rebuilt in the compute dtype per
    second, as its linear layer does for the forward and again for the backward; 0 where torchao is
    missing."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        return 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    weight = to_nf4(torch.randn(n, n, device=device, dtype=dtype), 64, 256)
    return n * n / timing.seconds(weight.get_original_weight, 5, synchronizer(device))


def cpu_rates(threads: int) -> dict:
    """This process's compute rates at `threads` threads: {"matmul" | "attention" | "elementwise": {dtype: ...}},
    and "reference": {dtype: seconds of reference.py's microbatch}."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    rates: dict = {"matmul": {}, "attention": {}, "elementwise": {}, "reference": {}}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        rates["matmul"][name] = matmul_curve(device, dtype, sizes=MATMUL_SIZES if dtype == torch.float32 else MATMUL_SIZES[:-1])
        rates["attention"][name] = attention_curve(device, dtype, (256, 512, 1024, 2048), head_dim=64)
        rates["elementwise"][name] = elementwise_rate(device, dtype)
        rates["reference"][name] = reference.measure(device, name)
    return rates


def _rates_worker(index: int, threads: int, out_dir: str) -> None:
    rates = cpu_rates(threads)
    with open(os.path.join(out_dir, f"rates-{index}.json"), "w") as f:
        json.dump(rates, f)


def _beside_others(threads: int, processes: int) -> dict:
    """cpu_rates(threads) measured in `processes` processes at once: each point the mean over them."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rates_worker, args=(threads, out), nprocs=processes, start_method="spawn")
        every = [json.loads(Path(out, f"rates-{i}.json").read_text()) for i in range(processes)]
    mean = statistics.fmean
    return {
        kind: {dtype: ([(points[0], mean(r[kind][dtype][i][1] for r in every)) for i, points in enumerate(first)]
                       if kind in ("matmul", "attention") else mean(r[kind][dtype] for r in every))
               for dtype, first in every[0][kind].items()}
        for kind in ("matmul", "attention", "elementwise", "reference")
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch 2.13 renamed the tensor forms (the old names warn); earlier versions have only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _collective_worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    sync = synchronizer(device)
    rows = []
    for nbytes in COLLECTIVE_BYTES:
        n = nbytes // 4
        full = torch.ones(n, device=device)
        shard = torch.ones(n // world, device=device)
        calls = {
            "all_reduce": (lambda: dist.all_reduce(full), 2 * nbytes * (world - 1) / world),
            "all_gather": (lambda: _ALL_GATHER(full, shard), nbytes * (world - 1) / world),
            "reduce_scatter": (lambda: _REDUCE_SCATTER(shard, full), nbytes * (world - 1) / world),
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
    measured = {"sync_s": _sync_cost(device, sync), **layout_costs(world, device, sync)}
    if rank == 0:
        measured["fsdp_links"] = {k: asdict(v) for k, v in measured["fsdp_links"].items()}
        with open(os.path.join(out_dir, "collectives.json"), "w") as f:
            json.dump({"rows": rows, **measured}, f)
    dist.destroy_process_group()


def _sync_cost(device: torch.device, sync) -> float:
    """Seconds a small blocking collective costs between compute segments of a few milliseconds, beyond what
    it costs back to back: the ranks never finish a segment together (on a shared CPU, by milliseconds), and
    each collective waits for the last. Tensor parallelism pays it at every block's gathers and scatters."""
    a = torch.randn(384, 384, device=device)
    small = torch.ones(1024, device=device)
    segment = lambda: [a @ a for _ in range(8)]  # noqa: E731
    calls = 40

    def timed(with_collective: bool) -> float:
        dist.barrier()
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            segment()
            if with_collective:
                dist.all_reduce(small)
        sync()
        return time.perf_counter() - start

    timed(True)  # warm-up
    alone, together = min(timed(False) for _ in range(2)), min(timed(True) for _ in range(2))
    back_to_back = min(timing.seconds(lambda: dist.all_reduce(small), 5, sync) for _ in range(2))
    return max(0.0, (together - alone) / calls - back_to_back)


def _exchange(buffer: torch.Tensor, rank: int) -> None:
    peer = 1 - rank if rank < 2 else rank
    if peer == rank:
        return
    recv = torch.empty_like(buffer)
    ops = [dist.P2POp(dist.isend, buffer, peer), dist.P2POp(dist.irecv, recv, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def measure_collectives(backend: str, world: int) -> dict:
    """The profile's fields that need several processes: each collective's fitted link ("intra"), the cost
    of a blocking one between compute segments (_sync_cost), and the parallel wrappers' own costs
    (calibrate_layouts.py)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_collective_worker, args=(world, _free_port(), backend, out), nprocs=world,
                           start_method="spawn")
        measured = json.loads(Path(out, "collectives.json").read_text())
    points: dict[str, list] = {}
    for name, nbytes, seconds in measured.pop("rows"):
        points.setdefault(name, []).append((nbytes, seconds))
    measured["fsdp_links"] = {k: Link(**v) for k, v in measured["fsdp_links"].items()}
    return {"intra": {name: Link.fit(points[name]) for name in COLLECTIVES}, **measured}


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
    t_mm = timing.seconds(mm, 3, lambda: None, best=True)
    t_copy = timing.seconds(copy, 3, lambda: None, best=True)
    import threading

    def both():
        thread = threading.Thread(target=lambda: [copy() for _ in range(max(1, round(t_mm / t_copy)))])
        thread.start()
        mm()
        thread.join()

    t_both = timing.seconds(both, 3, lambda: None, best=True)
    copies = max(1, round(t_mm / t_copy)) * t_copy
    return max(0.0, min(1.0, (t_mm + copies - t_both) / min(t_mm, copies)))


def process_bytes() -> float:
    """A training process's own memory before it builds anything: the interpreter and the libraries the
    trainer imports (a fresh process's resident high-water mark right after the imports: /proc's VmHWM, which
    unlike getrusage's maxrss does not carry over the parent's across exec), which no estimate counts."""
    code = ("import trainer.trainer, pathlib; "
            "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True).stdout
        return int(out.split()[-2]) * 1024  # "VmHWM:  123456 kB"
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return 0.0


def calibrate(name: str = "this machine", collectives: bool = True) -> DeviceProfile:
    """This machine's profile: its first GPU where there is one, else its CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        dtypes = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.bfloat16, torch.float32)}
        matmul = {k: matmul_curve(device, d, sizes=(256, 512, 1024, 2048, 4096, 8192)) for k, d in dtypes.items()}
        attention = {k: attention_curve(device, d, (512, 2048, 8192), head_dim=128) for k, d in dtypes.items()}
        elementwise = {k: elementwise_rate(device, d) for k, d in dtypes.items()}
        measured = {k: reference.measure(device, k) for k in dtypes}
        props = torch.cuda.get_device_properties(0)
        world = min(torch.cuda.device_count(), 8)
        several = measure_collectives("nccl", world) if collectives and world > 1 else {}
        memory, cores, per_node = props.total_memory, 0, torch.cuda.device_count()
        name = props.name if name == "this machine" else name
    else:
        device = torch.device("cpu")
        cores, _ = usable_cores()
        threads = sorted({1, *[2**i for i in range(1, cores.bit_length()) if 2**i <= cores], cores})
        matmul, attention, elementwise, measured = {}, {}, {}, {}
        for count in threads:
            # A rank of `count` threads computes beside the node's other ranks (cores / count of them), which
            # share its caches and memory bandwidth: its rates are measured with all of them computing at once.
            rates = cpu_rates(count) if count == cores else _beside_others(count, cores // count)
            for kind, table in (("matmul", matmul), ("attention", attention), ("elementwise", elementwise),
                                ("reference", measured)):
                table.update({f"{dtype}@{count}": value for dtype, value in rates[kind].items()})
        torch.set_num_threads(cores)
        several = measure_collectives("gloo", 2) if collectives else {}
        with open("/proc/meminfo") as f:
            memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        per_node = cores  # a CPU rank takes at least a core
    # One device: nothing to measure; a slow placeholder that layouts over several never win with.
    links = several.pop("intra", None) or {c: Link(1e-3, 1e9) for c in COLLECTIVES}
    peaks: dict[str, float] = {}
    for key, points in matmul.items():  # the best any size and thread count reached
        dtype = key.split("@")[0]
        peaks[dtype] = max(peaks.get(dtype, 0.0), *(f for _, f in points))
    notes = [f"calibrated {time.strftime('%Y-%m-%d')} on {socket.gethostname()}",
             "between nodes: the same rates as inside one (one host cannot measure a network)"]
    profile = DeviceProfile(name=name, kind=device.type if device.type == "cpu" else "gpu", memory_bytes=float(memory),
                         peak_flops=peaks, matmul=matmul, attention=attention, elementwise=elementwise,
                         memory_bytes_per_s=memory_bandwidth(device), intra=links,
                         inter=links, devices_per_node=per_node, overlap=overlap_share(device),
                         float8_speedup=float8_speedup(device), dequantize_per_s=dequantize_rate(device), **several,
                         cores=cores,
                         process_bytes=process_bytes(),
                         source="calibrated", notes=notes)
    # Last: the efficiency compares the reference's measured time with the time model on the rates above.
    return dataclasses.replace(profile, compute_efficiency=reference.efficiency(profile, measured))
