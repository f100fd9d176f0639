"""python -m bench.attention [--seq 2048] [--batch 1] [--heads 32] [--kv-heads 8] [--head-dim 64] [--repeats 5]

One attention layer's forward + backward in the ways this project can run it: grouped-query keys and
values repeated into copies (what the model did before enable_gqa) or read in place (enable_gqa), causal
or over packed documents (SDPA with a boolean mask; FlexAttention where it can train: CUDA). Per row: the
median time of --repeats runs after one warm-up, the bytes autograd keeps for backward (counted by
saved-tensor hooks: what each way holds between forward and backward, on any device), and on CUDA the
peak allocated memory. Llama 3.2 1B's attention shape by default (32 query heads, 8 kv heads, 64 dims).
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from models.common.masking import WindowMask
from trainer.cli import Parser, at_least, run_command


def _documents(batch: int, seq: int, device) -> torch.Tensor:
    """Documents of 1/8, 3/8 and 1/2 of the window: a packed SFT window's kind of mix."""
    cuts = [seq // 8, seq // 2]
    ids = torch.zeros(seq, dtype=torch.long, device=device)
    for cut in cuts:
        ids[cut:] += 1
    return ids.expand(batch, seq).contiguous()


def _attention(way: str, q, k, v, documents):
    if way.startswith("repeated"):
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    if way.endswith("causal"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    kernel = "flex" if "flex" in way else "sdpa"
    return WindowMask.build(documents, seq=q.shape[2], kernel=kernel).attend(q, k, v)


def measure(way: str, *, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, repeats: int, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=generator, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=generator,
                        requires_grad=True) for _ in range(2))
    documents = _documents(batch, seq, device)
    saved = [0]

    def keep(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        saved[0] = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = _attention(way, q, k, v, documents)
        out.float().square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up (and compiles)
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    row = {"way": way, "ms": 1000 * statistics.median(times), "saved_mib": saved[0] / 2**20}
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("--seq", type=at_least(16), default=2048)
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--heads", type=at_least(1), default=32)
    parser.add_argument("--kv-heads", type=at_least(1), default=8)
    parser.add_argument("--head-dim", type=at_least(8), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ways = ["repeated, causal", "enable_gqa, causal", "repeated, document (sdpa mask)", "enable_gqa, document (sdpa mask)"]
    if device.type == "cuda":
        ways.append("enable_gqa, document (flex)")
    shape = dict(batch=args.batch, seq=args.seq, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    print(f"attention forward + backward on {device.type}, {shape}, median of {args.repeats}")
    header = "| way | ms | saved for backward (MiB) |" + (" peak allocated (MiB) |" if device.type == "cuda" else "")
    print(header)
    print("|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for way in ways:
        row = measure(way, **shape, repeats=args.repeats, device=device)
        cells = [row["way"], f"{row['ms']:.1f}", f"{row['saved_mib']:.1f}"]
        if "peak_mib" in row:
            cells.append(f"{row['peak_mib']:.0f}")
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
