"""Tokenize a dataset once into memory-mapped token shards: python -m trainer.data.prepare --config X --output DIR.

The run's own config says what to read (data.*) and with which tokenizer (tokenizer.*); overrides work as in
train.py. Documents are cut into shards of --docs-per-shard consecutive documents, tokenized by --num-proc
processes; each finished shard is renamed into place with a `.done` record, so an interrupted prepare
started again with the same command does only the shards it lacks. The manifest (prepared.json) is written
last: a directory without one is not yet prepared data. Then `data.source=DIR` trains with no tokenization.
"""

import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from trainer.cli import Parser, at_least, run_command
from trainer.errors import DataError, UserError
from trainer.file_digest import file_digest

PLAN = "prepare-plan.json"
MAX_DOCS_PER_SHARD = 100_000


def _source_of(data) -> dict:
    keys = ("source", "format", "text_field", "text_sample_by", "hub_config", "split")
    return {k: getattr(data, k) for k in keys}


# One worker process's reader, built once by _start_worker (spawned processes share nothing with the parent).
_worker = {}


def _start_worker(config: str | None, overrides: list[str]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
    from trainer.config import load_config
    from trainer.data.sources import load_documents
    from trainer.data.loader import make_tokenize
    from trainer.tokenizer import build_tokenizer

    cfg = load_config(config, overrides)
    docs = load_documents(cfg.data)
    _worker["tokenize"] = make_tokenize(docs, build_tokenizer(cfg.tokenizer), cfg.data)


# Tokens a worker holds before it appends them to the shard's files: a shard of any size is written in
# pieces of about 64 MB of int64, so a worker's memory does not grow with it.
_FLUSH_TOKENS = 8 << 20


def write_shard(directory: str, index: int, first: int, last: int, dtype: str, sft: bool) -> dict:
    """Tokenizes documents first .. last - 1 into shard `index`; returns its .done record."""
    tokenize = _worker["tokenize"]
    name = f"shard-{index:05d}"
    # Tests interrupt a prepare part-way: this slows each shard down enough to do it reliably.
    time.sleep(float(os.environ.get("TESSERA_DEBUG_PREPARE_DELAY", "0")))
    paths = {suffix: Path(directory) / f"{name}.{suffix}" for suffix in ("tokens", "offsets", "trained")}
    files = {suffix: open(f"{path}.tmp", "wb") for suffix, path in paths.items() if sft or suffix != "trained"}
    limit = np.iinfo(np.dtype(dtype)).max
    lengths, pieces, held, total = np.zeros(last - first, dtype=np.int64), [], 0, 0

    def flush() -> None:
        ids = np.concatenate(pieces)
        tokens = np.where(ids >= 0, ids, -ids - 1)
        if tokens.max() > limit:
            raise DataError(f"a token id of {tokens.max()} in documents {first}..{last - 1} does not fit {dtype} (the "
                            f"tokenizer's vocab_size said it would): prepare with --dtype uint32")
        tokens.astype(dtype).tofile(files["tokens"])
        if sft:
            (ids >= 0).astype(np.uint8).tofile(files["trained"])
        pieces.clear()

    for n, i in enumerate(range(first, last)):
        ids = np.asarray(tokenize(i), dtype=np.int64)
        lengths[n] = len(ids)
        if len(ids):
            pieces.append(ids)
            held += len(ids)
        if held >= _FLUSH_TOKENS or (n == last - first - 1 and pieces):
            total, held = total + held, 0
            flush()
    np.concatenate([[0], np.cumsum(lengths)]).astype("<i8").tofile(files["offsets"])
    record = {"name": name, "documents": last - first, "tokens": total, "files": {}}
    for suffix, file in files.items():
        file.close()
        os.replace(f"{paths[suffix]}.tmp", paths[suffix])
        record["files"][suffix] = {"bytes": paths[suffix].stat().st_size, "xxh3_64": file_digest(paths[suffix])}
    done = Path(directory) / f"{name}.done"
    Path(f"{done}.tmp").write_text(json.dumps(record))
    os.replace(f"{done}.tmp", done)  # whole or absent: a kill mid-write leaves no half record to resume from
    return record


def _progress(done: int, total: int, tokens: int, started: float, final: bool = False) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    line = (f"prepare: {done}/{total} shards, {tokens / 1e6:,.2f} M tokens, {tokens / elapsed / 1e6:,.2f} M tokens/s, "
            f"{elapsed:,.1f} s")
    if sys.stdout.isatty():
        print(f"\r{line}", end="\n" if final else "", flush=True)
    elif final or done % max(1, total // 10) == 0:
        print(line, flush=True)


def prepare(config: str | None, overrides: list[str], output: Path, num_proc: int, docs_per_shard: int | None,
            dtype: str | None) -> dict:
    from trainer.config import load_config
    from trainer.data.sources import load_documents
    from trainer.data.loader import make_tokenize
    from trainer.data.shards import FORMAT, MANIFEST, VERSION, is_prepared, manifest_checksum
    from trainer.data.sft import check_records
    from trainer.tokenizer import build_tokenizer
    from trainer.tokenizer.identity import describe, fingerprint

    # Shards are cut by document index: the source is read map-style (datasets' memory-mapped cache) even
    # where the run would stream it.
    overrides = [*overrides, "data.streaming=false"]
    cfg = load_config(config, overrides)
    if is_prepared(cfg.data.source):
        raise UserError(f"data.source={cfg.data.source} is prepared already: train from it (data.source={cfg.data.source})")
    if output.exists() and is_prepared(output):
        raise UserError(f"--output {output} holds prepared data already; choose another directory or remove it")
    if output.is_file() or (output.is_dir() and any(output.iterdir()) and not (output / PLAN).is_file()):
        raise UserError(f"--output {output} is not empty and holds no preparation of ours; choose an empty or new directory")
    tokenizer = build_tokenizer(cfg.tokenizer)
    docs = load_documents(cfg.data)
    tokenize = make_tokenize(docs, tokenizer, cfg.data)
    skipped = check_records(tokenize) if cfg.data.task == "sft" else []  # SFT sets are small: every record now
    dtype = dtype or ("uint16" if tokenizer.vocab_size <= 2**16 else "uint32")
    settings = {"task": cfg.data.task, "add_bos": cfg.data.add_bos, "add_eos": cfg.data.add_eos,
                "sft_format": getattr(tokenize, "fmt", cfg.data.sft_format), "skip_bad_records": cfg.data.skip_bad_records}
    plan = {
        "source": _source_of(cfg.data), "settings": settings, "documents": len(docs), "dtype": dtype,
        "tokenizer": {"fingerprint": fingerprint(tokenizer), "name": describe(cfg.tokenizer), "vocab_size": tokenizer.vocab_size},
        "docs_per_shard": docs_per_shard or min(MAX_DOCS_PER_SHARD, max(1, math.ceil(len(docs) / (4 * num_proc)))),
    }
    output.mkdir(parents=True, exist_ok=True)
    plan_file = output / PLAN
    if plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        if docs_per_shard is None:
            plan["docs_per_shard"] = earlier["docs_per_shard"]  # the shard cut of the interrupted prepare
        if earlier != plan:
            differs = sorted(k for k in plan if plan[k] != earlier.get(k))
            raise UserError(f"--output {output} holds part of another preparation (it differs in {', '.join(differs)}); "
                            f"choose another directory, or remove it to start again")
    plan_file.write_text(json.dumps(plan, indent=1))

    per = plan["docs_per_shard"]
    cuts = [(k, a, min(a + per, len(docs))) for k, a in enumerate(range(0, len(docs), per))]
    records = {}
    for k, _, _ in cuts:
        done = output / f"shard-{k:05d}.done"
        if done.is_file():
            records[k] = json.loads(done.read_text())
    todo = [c for c in cuts if c[0] not in records]
    started, tokens = time.perf_counter(), 0
    if records:
        print(f"prepare: resuming: {len(records)} of {len(cuts)} shards are done already", flush=True)
    sft = cfg.data.task == "sft"
    def finished(record: dict) -> None:
        nonlocal tokens
        records[int(record["name"].split("-")[1])] = record
        tokens += record["tokens"]
        _progress(len(records), len(cuts), tokens, started)

    if num_proc == 1:  # in this process: no worker to start
        _worker["tokenize"] = tokenize
        for k, a, b in todo:
            finished(write_shard(str(output), k, a, b, dtype, sft))
    elif todo:
        with ProcessPoolExecutor(max_workers=min(num_proc, len(todo)), mp_context=get_context("spawn"),
                                 initializer=_start_worker, initargs=(config, list(overrides))) as pool:
            futures = [pool.submit(write_shard, str(output), k, a, b, dtype, sft) for k, a, b in todo]
            for future in as_completed(futures):
                finished(future.result())
    shards = [records[k] for k, _, _ in cuts]
    manifest = {"format": FORMAT, "version": VERSION, **{k: v for k, v in plan.items() if k != "docs_per_shard"},
                "skipped": skipped, "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    manifest["checksum"] = manifest_checksum(manifest)
    (output / f"{MANIFEST}.tmp").write_text(json.dumps(manifest, indent=1))
    os.replace(output / f"{MANIFEST}.tmp", output / MANIFEST)
    for k, _, _ in cuts:
        (output / f"shard-{k:05d}.done").unlink()
    for stray in output.glob("*.tmp"):  # what a killed earlier attempt was writing
        stray.unlink()
    plan_file.unlink()
    elapsed = time.perf_counter() - started
    print(f"prepare: {len(docs):,} documents, {manifest['tokens']:,} tokens ({dtype}) in {len(cuts)} shards -> {output}; "
          f"{elapsed:.1f} s, {tokens / max(elapsed, 1e-9) / 1e6:.2f} M tokens/s with {num_proc} processes. "
          f"Train from it: data.source={output}", flush=True)
    return manifest


def parse_args(argv: list[str]):
    parser = Parser(prog="python -m trainer.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="the run's YAML config (its data and tokenizer sections)")
    parser.add_argument("--output", required=True, type=Path, help="the directory to write (new or empty)")
    parser.add_argument("--num-proc", type=at_least(1), default=os.cpu_count() or 1, help="tokenizing processes")
    parser.add_argument("--docs-per-shard", type=at_least(1), default=None,
                        help=f"documents in each shard (default: a quarter of each process's share, at most {MAX_DOCS_PER_SHARD:,})")
    parser.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                        help="token storage (default: uint16 where the vocabulary fits)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, as for train.py")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    prepare(args.config, args.overrides, args.output, args.num_proc, args.docs_per_shard, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
