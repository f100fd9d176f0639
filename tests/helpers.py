"""Running train.py as a user would (python or torchrun subprocesses) and reading what it wrote."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
# A model shape whose every weight splits into whole NF4 double-quantization groups (256 scales) over 1
# or 2 FSDP ranks, so both quantize identically (smaller weights get smaller groups; see quantize.py).
QUANT_SHAPE = ["model.dim=256", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden_dim=768", "model.n_layers=2"]


def document_attention() -> list[str]:
    """Overrides that train on Tiny Shakespeare's speeches (several to a window) with each attending only
    to itself: runs in which document masks matter. Skips (fails under CI) without ../shared/data."""
    from tests.conftest import _shared

    text = _shared("text/tinyshakespeare/input.txt")
    return [f"data.source={text}", "data.text_sample_by=paragraph", "data.attention=document"]


def stories260k_args(shared) -> list[str]:
    """Overrides that start from karpathy's pretrained stories260K with its own tokenizer."""
    return [
        "model.flavor=null", f"model.init_from={shared('models/stories260K/stories260K.bin')}",
        "tokenizer.kind=auto", f"tokenizer.path={shared('tokenizers/tok512/tok512.model')}",
    ]


def _command(args: list[str], nproc: int, env: dict | None) -> tuple[list[str], dict]:
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "train.py", *args]
    threads = "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    return cmd, {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, **(env or {})}


def run_train(args: list[str], nproc: int = 1, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, full_env = _command(args, nproc, env)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def start_train(args: list[str], log: Path, nproc: int = 1) -> subprocess.Popen:
    """train.py in the background, in a process group of its own (so that every rank can be killed at once)."""
    cmd, full_env = _command(args, nproc, None)
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def kill_tree(pid: int, sig: int) -> None:
    """Signals a process and all its descendants at once (torchrun puts each rank in a session of its own)."""
    tree, todo, found = _children(), [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    for p in found:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def wait_until(condition, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def tensorboard_tags(output_dir: Path) -> list[str]:
    """The scalar tags a run wrote."""
    accumulator = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator.Tags()["scalars"]


def tensorboard_scalars(output_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar, read back with TensorBoard's own event reader."""
    accumulator = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def kill_9_and_resume(args: list[str], out: Path, reference: Path, *, nproc: int, checkpoint_step: int,
                      compare: range) -> subprocess.CompletedProcess:
    """train.py in `out`, every rank killed with SIGKILL once checkpoints/step-N exists, then started again
    to the end: it must resume, and its losses over `compare` equal the uninterrupted `reference` run's
    bit for bit. Returns the resumed run's result."""
    proc = start_train([*args, f"job.output_dir={out}"], out.parent / f"{out.name}-first.log", nproc=nproc)
    wait_until(lambda: (out / "checkpoints" / f"step-{checkpoint_step}").is_dir(),
               what=f"the step-{checkpoint_step} checkpoint")
    kill_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_train([*args, f"job.output_dir={out}"], nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    want, got = tensorboard_scalars(reference, "loss/train"), tensorboard_scalars(out, "loss/train")
    assert [got[s] for s in compare] == [want[s] for s in compare]  # bitwise
    return resumed


def layout_runner(tmp_path_factory, layouts: dict, common: list[str]):
    """layout name -> its run's output directory, each run once: `layouts` maps a name to (ranks,
    overrides); a name ending in "document" trains with document attention."""
    runs = {}

    def run(layout: str):
        if layout not in runs:
            nproc, overrides = layouts[layout]
            out = tmp_path_factory.mktemp("layout")
            attention = document_attention() if layout.endswith("document") else []
            result = run_train([*common, f"job.output_dir={out}", *overrides, *attention], nproc=nproc)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[layout] = out
        return runs[layout]

    return run


def flavor_args(name: str, **overrides):
    """The shape of a named flavor (its family's args dataclass), with single fields changed."""
    from models import find_flavor

    family, fields = find_flavor(name)
    return family.args(**{**fields, **overrides})


def build_adapted(args, cfg, init_from, seed: int, device: str = "cpu"):
    """A whole model with fresh adapters (`cfg`: an AdaptersConfig) over its base from `init_from` (or the
    seeded init), built in one process the way every run's model is."""
    from trainer.build import build_whole_model
    from trainer.config.schema import ExportConfig
    from trainer.converters.adapters import AdapterConverter

    converter = AdapterConverter(cfg, ExportConfig(), init_from=init_from, seed=seed)
    return build_whole_model(args, [converter], init_from=init_from, seed=seed, device=device)
