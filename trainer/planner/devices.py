"""What the planner knows of a device: datasheet figures for the GPUs users rent, or a profile that
`--calibrate` measured on this machine (JSON). A profile is the rates the time model divides by:
matmul FLOP/s by precision and matmul size, memory bandwidth, and per collective a latency and a bus
bandwidth inside a node and between nodes.

Datasheet profiles assume what well-tuned kernels reach (cuBLAS GEMMs near 75% of the dense peak at large
sizes, NCCL near 80% of a link's bandwidth); a calibrated profile replaces the assumption by measurement.
"""

import bisect
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.errors import ConfigError

GIB = 2**30
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


@dataclass(frozen=True)
class Link:
    """A collective's cost: latency_s + bytes moved per rank / bus_bytes_per_s (nccl-tests' 'bus bandwidth':
    the ring factors (n-1)/n and 2(n-1)/n are applied by the caller)."""

    latency_s: float
    bus_bytes_per_s: float

    def seconds(self, bus_bytes: float, calls: int = 1) -> float:
        return calls * self.latency_s + bus_bytes / self.bus_bytes_per_s if bus_bytes > 0 else 0.0

    @staticmethod
    def fit(points: list[tuple[float, float]]) -> "Link":
        """Least squares of seconds = latency + bus_bytes / bandwidth over [(bus bytes, seconds)], latency at
        least zero."""
        xs, ys = [b for b, _ in points], [s for _, s in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        slope = max(slope, 1e-15)
        return Link(latency_s=max(0.0, my - slope * mx), bus_bytes_per_s=1 / slope)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str  # "gpu" or "cpu"
    memory_bytes: float  # per device (CPU: the host's memory, shared by the ranks on it)
    peak_flops: dict[str, float]  # dense peak by compute dtype: MFU's denominator
    # Achieved FLOP/s of a linear layer's training matmuls (forward and backward, many tokens) by key "dtype"
    # (GPU) or "dtype@threads" (CPU), as [(size, FLOP/s)] with size the geometric mean of the weight's two
    # dimensions, ascending; interpolated in log size between points.
    matmul: dict[str, list[tuple[float, float]]]
    # Achieved FLOP/s of causal attention (scaled dot product, forward and backward) by the same keys, as
    # [(sequence length, FLOP/s)] counted as flops_per_token does (12 x dim x seq_len per token and layer).
    attention: dict[str, list[tuple[float, float]]]
    memory_bytes_per_s: float  # what the optimizer step streams at
    # What a block's elementwise ops (norms, activations, their backward) reach in bytes/s by the same keys,
    # counted as the time model counts them (estimate.py's ELEMENTWISE_PASSES per saved element).
    elementwise: dict[str, float]
    intra: dict[str, Link]  # collectives inside a node, by name (COLLECTIVES)
    inter: dict[str, Link]  # between nodes
    devices_per_node: int
    # The share of FSDP's and data-parallel gradient traffic hidden under compute (prefetched gathers, reduce-
    # scatters of finished blocks): GPUs run them on their own streams; on CPU the cores that compute also copy.
    overlap: float
    float8_speedup: float = 0.0  # float8 matmul time = bf16's / this (0: no float8 on this device)
    dequantize_per_s: float = 0.0  # 4-bit weights (NF4) rebuilt in the compute dtype per second
    # What a blocking collective between compute segments costs beyond its latency and bytes: the wait for the
    # last rank to arrive (tensor, context and expert parallelism's collectives pay it; calibrated).
    sync_s: float = 0.0
    # Measured through the parallel wrappers themselves (calibrate_layouts.py), inside a node; absent (a
    # datasheet): the raw collectives' links stand in. FSDP2's per-block cost by "gather" / "reduce" (and
    # "replicate_gather" / "replicate_reduce" for replicas), and a tensor-parallel block's fixed cost beyond
    # its bytes, forward and forward + backward.
    fsdp_links: dict[str, Link] = field(default_factory=dict)
    # What the time model's compute terms reach of a real training microbatch's time, by the matmul keys
    # (reference.py: a small Llama measured against its prediction); absent: 1.
    compute_efficiency: dict[str, float] = field(default_factory=dict)
    tp_forward_s: float = 0.0
    tp_block_s: float = 0.0
    cores: int = 0  # CPU: the host's cores, shared by its ranks
    # A rank's own memory before training allocates (interpreter, libraries; CPU: in the host's memory).
    process_bytes: float = 0.0
    source: str = "datasheet"
    notes: list[str] = field(default_factory=list)

    def matmul_flops(self, dtype: str, size: float, threads: int = 1) -> float:
        """Achieved FLOP/s of a linear layer's training matmuls for a weight of geometric-mean size `size`."""
        return self._rate(self.matmul, "matmul", dtype, size, threads)

    def attention_flops(self, dtype: str, seq_len: float, threads: int = 1) -> float:
        return self._rate(self.attention, "attention", dtype, seq_len, threads)

    def elementwise_bytes_per_s(self, dtype: str, threads: int = 1) -> float:
        return self.elementwise.get(self._key(dtype, threads)) or max(self.elementwise.values())

    def efficiency(self, dtype: str, threads: int = 1) -> float:
        return self.compute_efficiency.get(self._key(dtype, threads), 1.0)

    def _key(self, dtype: str, threads: int) -> str:
        return dtype if self.kind == "gpu" else f"{dtype}@{self._threads_key(dtype, threads)}"

    def _rate(self, table: dict, what: str, dtype: str, size: float, threads: int) -> float:
        key = self._key(dtype, threads)
        if key not in table:
            raise ConfigError(f"device profile {self.name!r} has no {dtype} {what} rate; run --calibrate with it, or pick "
                              f"a compute dtype it has ({', '.join(sorted(table))})")
        points = table[key]
        sizes = [s for s, _ in points]
        i = bisect.bisect_left(sizes, size)
        if i == 0:  # below the smallest measured size: throughput falls with the work per call
            return points[0][1] * (size / sizes[0]) ** 1.5
        if i == len(points):
            return points[-1][1]
        (s0, f0), (s1, f1) = points[i - 1], points[i]
        t = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return f0 + t * (f1 - f0)

    def _threads_key(self, dtype: str, threads: int) -> int:
        """The measured thread count nearest below `threads` (CPU)."""
        have = sorted(int(k.split("@")[1]) for k in self.matmul if k.startswith(dtype + "@"))
        if not have:
            return threads
        below = [t for t in have if t <= threads]
        return below[-1] if below else have[0]

    def link(self, collective: str, across_nodes: bool) -> Link:
        return (self.inter if across_nodes else self.intra)[collective]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _gpu(name, memory_gib, bf16_tflops, fp32_tflops, hbm_tb_s, link_gb_s, network_gb_s, float8=0.0) -> DeviceProfile:
    peak = bf16_tflops * 1e12
    # cuBLAS by weight size n (many tokens): small weights cannot fill the SMs.
    efficiency = [(256, 0.12), (512, 0.3), (1024, 0.55), (2048, 0.68), (4096, 0.75), (16384, 0.75)]
    matmul = {"bfloat16": [(n, e * peak) for n, e in efficiency],
              "float32": [(n, e * fp32_tflops * 1e12) for n, e in efficiency]}
    # Flash attention by sequence length, causal, forward + backward (FlashAttention-2's published H100 and
    # A100 figures are 35-55% of the dense peak for head_dim 128 at 2K-16K).
    by_seq = [(512, 0.2), (2048, 0.35), (8192, 0.45), (32768, 0.5)]
    attention = {"bfloat16": [(n, e * peak) for n, e in by_seq],
                 "float32": [(n, e * fp32_tflops * 1e12) for n, e in by_seq]}
    intra = {c: Link(20e-6, 0.8 * link_gb_s * 1e9) for c in COLLECTIVES}
    inter = {c: Link(40e-6, 0.8 * network_gb_s * 1e9) for c in COLLECTIVES}
    return DeviceProfile(name=name, kind="gpu", memory_bytes=memory_gib * GIB,
                         peak_flops={"bfloat16": peak, "float32": fp32_tflops * 1e12}, matmul=matmul, attention=attention,
                         memory_bytes_per_s=0.8 * hbm_tb_s * 1e12,
                         elementwise={"bfloat16": 0.5 * hbm_tb_s * 1e12, "float32": 0.5 * hbm_tb_s * 1e12}, intra=intra, inter=inter, devices_per_node=8,
                         overlap=0.9, float8_speedup=float8,
                         # Memory bound: half a byte read and two written per weight, at half the bandwidth.
                         dequantize_per_s=0.5 * hbm_tb_s * 1e12 / 2.5)


# Dense (no sparsity) datasheet figures of SXM parts; links per direction (NVLink 4: 450 GB/s of the 900 GB/s
# both ways; A100's NVLink 3: 300), the network one 400 Gb/s NIC per GPU (A100, L40S: 200 Gb/s). float32 is
# TF32 tensor-core math off (torch's default for matmuls). float8: torchao's measured end-to-end matmul
# speedup over bf16 on H100 is about 1.5x where the datasheet says 2x (the casts cost).
DATASHEETS = {
    "h100-80gb": _gpu("h100-80gb", 79.6, 989.5, 67, 3.35, 450, 50, float8=1.5),
    "h200": _gpu("h200", 139.8, 989.5, 67, 4.8, 450, 50, float8=1.5),
    "a100-80gb": _gpu("a100-80gb", 79.3, 312, 19.5, 2.04, 300, 25),
    # PCIe Gen4 x16 between cards (no NVLink): 32 GB/s a direction.
    "l40s": _gpu("l40s", 44.4, 362, 91.6, 0.864, 32, 25, float8=1.5),
}


def load_profile(device: str) -> DeviceProfile:
    """A datasheet name or a calibrated profile's JSON file."""
    if device in DATASHEETS:
        return DATASHEETS[device]
    path = Path(device)
    if not path.is_file():
        raise ConfigError(f"--device {device!r} is neither a known device ({', '.join(DATASHEETS)}) nor a profile file; "
                          f"make one for this machine with --calibrate --profile-out FILE")
    try:
        raw = json.loads(path.read_text())
        raw["intra"] = {k: Link(**v) for k, v in raw["intra"].items()}
        raw["inter"] = {k: Link(**v) for k, v in raw["inter"].items()}
        raw["fsdp_links"] = {k: Link(**v) for k, v in raw.get("fsdp_links", {}).items()}
        raw["matmul"] = {k: [tuple(p) for p in v] for k, v in raw["matmul"].items()}
        raw["attention"] = {k: [tuple(p) for p in v] for k, v in raw["attention"].items()}
        return DeviceProfile(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"--device {path}: not a device profile ({e}); make one with --calibrate --profile-out FILE") from None
