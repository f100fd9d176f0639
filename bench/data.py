"""Pretraining data at scale, measured: how fast `prepare` tokenizes, how fast the loader cuts windows out of
prepared shards, what share of a cpu-207m step waits for data from shards, and a text file larger than the
memory a run is given, trained from a stream and from shards under that limit.

python -m bench.data [--corpus-mb 64] [--tokenizer PATH] [--large-gb 2] [--limit-gb 1.5] [--out DIR]

Rows, each with the command or settings that made it:
- prepare: tokens/s of `python -m trainer.data.prepare` over a corpus of real web documents (the C4 sample's,
  repeated to --corpus-mb, each made distinct) with --tokenizer (default Llama 3's), 1 and 2 processes;
- loader: tokens/s of PackedLoader.next_batch() on one thread: windows of 2,048 + 1 tokens, 8 to a batch, out of
  those shards, and from the same text tokenized on the fly;
- cpu-207m: the share of the step the training loop waited for its batches (metrics' data %), training the
  cpu-207m preset's model from prepared shards, with the background thread (data.prefetch=2) and without (0);
- large: a --large-gb text file trained 20 steps (the debug model) from a stream and, after `prepare` (byte
  tokens), from shards, each process in a memory cgroup of --limit-gb (root on Linux; else unlimited, said so):
  its peak RSS, and whether the limit held (the kernel reclaims page cache under it; anonymous memory over it
  would end the run).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.cli import Parser, run_command

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
DEBUG = ["--config", "configs/debug.yaml", "metrics.progress=off"]


def _corpus(path: Path, megabytes: float) -> Path:
    """Real web documents (the C4 sample's 300), repeated with a counter so no two are equal, to `megabytes`:
    a .txt file whose documents are separated by blank lines (read with data.text_sample_by=paragraph)."""
    documents = [json.loads(line)["text"].replace("\n\n", "\n") for line in (SHARED / "text/c4/c4_demo.jsonl").read_text().splitlines()]
    target, written, n = int(megabytes * 2**20), 0, 0
    with open(path, "w") as f:
        while written < target:
            block = "".join(f"{n + i}. {d}\n\n" for i, d in enumerate(documents))
            f.write(block)
            written += len(block.encode())
            n += len(documents)
    return path


def _tokenizer_args(tokenizer: str) -> list[str]:
    return ["tokenizer.kind=byte"] if tokenizer == "byte" else ["tokenizer.kind=auto", f"tokenizer.path={tokenizer}"]


def _run(command: list[str], limit_bytes: int | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes of the process or its largest child, output) of `command`, in a memory
    cgroup of limit_bytes where one can be made."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('bench.data: maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
               "sys.exit(r.returncode)")
    group = _cgroup(limit_bytes) if limit_bytes else None
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=REPO, capture_output=True, text=True,
                            preexec_fn=(lambda: _join(group)) if group else None)
    seconds = time.perf_counter() - start
    if group:
        os.rmdir(group)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"bench.data: {' '.join(command[:4])} ... failed (exit {result.returncode}):\n{output[-3000:]}")
    rss = int(output.rsplit("bench.data: maxrss", 1)[1].split()[0]) * 1024
    return seconds, rss, output


def _cgroup(limit_bytes: int) -> str | None:
    """A cgroup v1 memory group with this limit (None where this process cannot make one)."""
    root = Path("/sys/fs/cgroup/memory")
    if not root.is_dir() or os.geteuid() != 0:
        return None
    group = root / f"tessera-bench-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        return None
    return str(group)


def _join(group: str) -> None:
    Path(group, "cgroup.procs").write_text(str(os.getpid()))


def _prepare(source: Path, out: Path, tokenizer: str, num_proc: int, more: list[str] = (), limit: int | None = None):
    command = ["-m", "trainer.data.prepare", "--output", str(out), "--num-proc", str(num_proc), f"data.source={source}",
               "data.text_sample_by=paragraph", *_tokenizer_args(tokenizer), *more]
    seconds, rss, output = _run([sys.executable, *command], limit)
    tokens = json.loads((out / "prepared.json").read_text())["tokens"]
    # prepare's own rate: tokenizing and writing, after the source is read and the processes started
    rate = float(output.rsplit(" M tokens/s with", 1)[0].rsplit(" ", 1)[1]) * 1e6
    return tokens, seconds, rss, rate


def _loader_speed(source: Path, tokenizer: str, seconds: float = 3.0) -> float:
    """Tokens/s of next_batch() on one thread, seq 2048 x batch 8."""
    import dataclasses

    import torch

    from trainer.config import load_config
    from trainer.data import load_documents, make_loader
    from trainer.tokenizer import build_tokenizer

    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.source={source}", "data.text_sample_by=paragraph", *_tokenizer_args(tokenizer)])
    tok = build_tokenizer(cfg.tokenizer)
    loader = make_loader(load_documents(cfg.data), tok, dataclasses.replace(cfg.data), 2048, 8, 0, 1, seed=0)
    loader.next_batch()
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        tokens += 8 * 2049
    return tokens / (time.perf_counter() - start)


def _train(out: Path, args: list[str], limit: int | None = None) -> tuple[float, int, list[dict]]:
    seconds, rss, _ = _run([sys.executable, "train.py", *DEBUG, f"job.output_dir={out}", *args], limit)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    return seconds, rss, [s for s in steps if s["kind"] == "step"]


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-mb", type=float, default=192)
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers/llama3"), help="a tokenizer path, or `byte`")
    parser.add_argument("--large-gb", type=float, default=2.0, help="0: skip the larger-than-memory rows")
    parser.add_argument("--limit-gb", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-data"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = (REPO / args.out).resolve() if not args.out.is_absolute() else args.out
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    rows = []

    corpus = _corpus(out / "corpus.txt", args.corpus_mb)
    for procs in (1, 2):
        tokens, seconds, _, rate = _prepare(corpus, out / f"prepared-{procs}", args.tokenizer, procs)
        rows.append(("prepare", f"{args.corpus_mb:g} MB of text, {Path(args.tokenizer).name} tokenizer, --num-proc {procs}",
                     f"{rate / 1e6:.2f} M tokens/s tokenizing ({tokens / 1e6:.1f} M tokens; {seconds:.1f} s with start-up)"))
    shards_speed = _loader_speed(out / "prepared-2", args.tokenizer)
    text_speed = _loader_speed(corpus, args.tokenizer, seconds=5.0)
    rows.append(("loader", "windows of 2,048 + 1 tokens, 8 a batch, one thread, from shards", f"{shards_speed / 1e6:.1f} M tokens/s"))
    rows.append(("loader", "the same, from the text tokenized on the fly", f"{text_speed / 1e6:.2f} M tokens/s"))

    # cpu-207m from shards: the preset's model and batch (bench/presets.py), byte tokens of the stdlib corpus.
    from bench.ours import overrides
    from bench.presets import PRESETS

    stdlib_shards = out / "stdlib-byte"
    _run([sys.executable, "-m", "trainer.data.prepare", "--output", str(stdlib_shards), "--config", "configs/debug.yaml"])
    p = PRESETS["cpu-207m"]
    shape = [f"model.dim={p.dim}", f"model.n_layers={p.n_layers}", f"model.n_heads={p.n_heads}", f"model.n_kv_heads={p.n_kv_heads}",
             f"model.ffn_hidden_dim={p.ffn}", f"model.vocab_size={p.vocab}", "model.max_seq_len=1024"]
    # After its --config and flavor: the shape above, and data.source replaced below.
    preset = [*shape, *overrides(p, None, "full", 8)[3:]]
    for prefetch in (2, 0):
        _, _, steps = _train(out / f"207m-prefetch-{prefetch}", [*preset, f"data.source={stdlib_shards}",
                                                                 f"data.prefetch={prefetch}", "metrics.log_every=1"])
        later = [s for s in steps if s["step"] > 2]
        wait = sum(s["time/data_wait_percent"] for s in later) / len(later)
        step_s = sum(s["time/step_seconds"] for s in later) / len(later)
        rows.append(("cpu-207m", f"from shards, data.prefetch={prefetch}, steps 3-8",
                     f"data wait {wait:.4f}% of a {step_s:.2f} s step"))

    if args.large_gb > 0:
        large = _corpus(out / "large.txt", args.large_gb * 1024)
        limit = int(args.limit_gb * 2**30)
        limited = f"memory cgroup of {args.limit_gb:g} GiB" if _cgroup_possible() else "no memory limit (not root: no cgroup)"
        size = large.stat().st_size / 2**30
        seconds, rss, steps = _train(out / "baseline", ["training.steps=20"], limit)
        rows.append(("large", f"baseline: the same 20 steps from the stdlib corpus (map-style), {limited}",
                     f"peak RSS {rss / 2**30:.2f} GiB; {seconds:.0f} s"))
        seconds, rss, steps = _train(out / "large-stream", [f"data.source={large}", "data.text_sample_by=paragraph",
                                                            "data.streaming=true", "training.steps=20"], limit)
        rows.append(("large", f"{size:.2f} GiB text file, streamed, 20 steps, {limited}",
                     f"peak RSS {rss / 2**30:.2f} GiB; loss {steps[-1]['loss/train']:.3f} at step 20; {seconds:.0f} s"))
        tokens, seconds, prss, rate = _prepare(large, out / "large-shards", "byte", 2, limit=limit)
        rows.append(("large", f"prepare of it (byte tokens, 2 processes), {limited}",
                     f"{tokens / 1e9:.2f} G tokens in {seconds:.0f} s ({rate / 1e6:.1f} M tokens/s tokenizing); peak RSS {prss / 2**30:.2f} GiB"))
        seconds, rss, steps = _train(out / "large-shards-run", [f"data.source={out / 'large-shards'}", "training.steps=20"], limit)
        rows.append(("large", f"trained 20 steps from its shards, {limited}",
                     f"peak RSS {rss / 2**30:.2f} GiB; loss {steps[-1]['loss/train']:.3f} at step 20; {seconds:.0f} s"))

    print(f"\nbench.data, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs: python -m bench.data {' '.join(argv)}\n")
    print("| what | how | measured |\n|---|---|---|")
    for what, how, measured in rows:
        print(f"| {what} | {how} | {measured} |")
    return 0


def _cgroup_possible() -> bool:
    group = _cgroup(2**40)
    if group:
        os.rmdir(group)
    return group is not None


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
