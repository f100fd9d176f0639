"""Every command README.md, docs/ and examples/ show a user, executed as far as a CPU machine can: docs
that cannot rot. Each command is read from the Markdown (code blocks and inline code) and goes one way:

- train.py, torchrun and sbatch runs: `train.py ... --check --world-size N --for-another-machine` in this
  process (config, overrides, data, layout for N ranks; the 8B and 70B plans on the meta device), or as
  written when it is a --dry-run or a --plan (--calibrate: its flags parse); a command the doc follows with an `error:` line must print that line;
- benchmark commands: parsed by the benchmark's own parser (presets, methods, variant groups; the CPU
  benchmark itself runs in tests/e2e/test_bench.py; bench.attention, bench.long_context, bench.moe and bench.qat are
  measured in docs/long-context.md, docs/performance.md, docs/quantization.md and docs/data.md, bench.planner
  in docs/planner.md); data
  preparation: its arguments and config (tests/unit/test_data_at_scale.py runs it); the GPU acceptance script: its --dry plan; example scripts: they parse;
- pytest commands: the files exist and a -k expression selects tests; make targets exist;
- templates (`N`, `X`, `...`, `[--flag]`, `a|b`): every flag they show is one the command accepts;
- the README's ```sh walkthrough runs for real in tests/e2e/test_readme.py; others' tools (tensorboard,
  pip) and the Slurm cluster script (tests/slurm) are named in NOT_RUN_HERE, with the reason.
A command no rule covers fails the test: a new one in the docs needs a rule."""

import re
import shlex

import pytest

import train
from tests.helpers import REPO
from trainer.errors import UserError

SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.md"))]
PROGRAMS = r"(?:\$ )?(?:CI=true )?(?:\.venv/bin/)?(?:python3?|torchrun|sbatch|make|bash|pytest|tensorboard|pip|srun)\b"
TEMPLATE = re.compile(r"\.\.\.|\[|\||<|\b(?:N|X|K|T|PATH|STEP_DIR|OUT|NAME)\b")
NOT_RUN_HERE = {
    "tensorboard": "TensorBoard's viewer; tests read the event files themselves",
    "pip": "installs packages; `make setup` (run by CI) does",
    "python3 -c": "a busy loop the thread measurement ran beside the trainer",
    "srun": "a flag of Slurm's own, inside launch/slurm.sbatch (tests/slurm runs it on a real cluster)",
    "sbatch --signal": "a flag of Slurm's own, inside launch/slurm.sbatch (tests/slurm runs it on a real cluster)",
    "bash scripts/slurm_cluster.sh": "starts Slurm daemons: tests/slurm runs it",
    "CI=true": "the whole suite, which this test is part of",
    "make test": "the whole suite, which this test is part of",
}


def documented() -> list[tuple[str, str, str | None]]:
    """(where, command, the `error:` line the doc shows after it) of every command."""
    found = []
    for path in SOURCES:
        text, name = path.read_text(), path.relative_to(REPO).as_posix()
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if name == "README.md" and lang == "sh":
                continue  # run for real by test_readme
            lines = [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines()]
            for i, line in enumerate(lines):
                if re.match(PROGRAMS, line):
                    after = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("error:") else None
                    found.append((name, re.sub(r"\s+#.*$", "", line).removeprefix("$ "), after))
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(PROGRAMS + " ", span):
                found.append((name, " ".join(span.split()), None))
    return found


COMMANDS = documented()


def test_the_docs_were_read():
    assert len(COMMANDS) > 40 and {w for w, _, _ in COMMANDS} >= {"README.md", "docs/float8.md", "examples/slurm.md"}


def _train_args(command: str) -> tuple[list[str], int] | None:
    """(train.py's arguments, ranks) of a train.py, torchrun or sbatch command; None for other programs."""
    words = shlex.split(command)
    if "train.py" in words:
        ranks = next((int(w.split("=")[1]) for w in words if w.startswith("--nproc_per_node=")), None)
        if "--nproc_per_node" in words:
            ranks = int(words[words.index("--nproc_per_node") + 1])
        return words[words.index("train.py") + 1:], ranks or 1
    if words[0] == "sbatch" and "launch/slurm.sbatch" in words:
        flags = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--") and "=" in w)
        ranks = int(flags.get("nodes", 1)) * int(flags.get("gpus-per-node", 1))
        rest = words[words.index("launch/slurm.sbatch") + 1:]
        return ["--config", *rest], ranks
    return None


def _cpu_sized(args: list[str]) -> list[str]:
    """Overrides that let a GPU cluster's command be checked here: float8 numerics emulated without a
    float8 GPU, and the Hub's C4 replaced by the 300 C4 documents of ../shared/data (no network here)."""
    import torch

    from tests.conftest import _shared
    from trainer.config import load_config

    try:
        cfg = load_config(args[args.index("--config") + 1], [a for a in args if "=" in a and not a.startswith("-")])
    except UserError:
        return []  # a command the doc shows failing: train.py says why
    extra = []
    if cfg.fp8.enabled and not torch.cuda.is_available():
        extra.append("fp8.emulate=true")
    if cfg.data.source == "hub:allenai/c4":
        extra += [f"data.source={_shared('text/c4/c4_demo.jsonl')}", "data.hub_config=null"]
    return extra


def _help(program: str, capsys) -> str:
    """The --help text of one of our commands."""
    import importlib

    mains = {"train.py": train.parse_args, "trainer.generate": importlib.import_module("trainer.generate").main,
             "trainer.export": importlib.import_module("trainer.export").main,
             "launch": importlib.import_module("launch.local").main,
             "bench": importlib.import_module("bench.__main__").parse_args,
             "trainer.data.prepare": importlib.import_module("trainer.data.prepare").main,
             "bench.data": importlib.import_module("bench.data").main,
             "bench.planner": importlib.import_module("bench.planner").main}
    with pytest.raises(SystemExit):
        mains[program](["local", "--help"] if program == "launch" else ["--help"])
    return capsys.readouterr().out


def _program(command: str) -> str:
    words = command.split()
    if "train.py" in words:
        return "train.py"
    if "-m" in words:
        return words[words.index("-m") + 1]
    return words[0]


@pytest.mark.parametrize("where,command,error", COMMANDS, ids=[f"{w}: {c[:70]}" for w, c, _ in COMMANDS])
def test_documented_command(where, command, error, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    reason = next((why for prefix, why in NOT_RUN_HERE.items() if command.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"not run here: {reason}")
    program = _program(command)
    if command in ("python train.py", f"python -m {program}"):  # the command named in prose
        assert (REPO / "train.py").is_file() if program == "train.py" else _help(program, capsys)
        return
    if TEMPLATE.search(command):
        flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", command)) - {"--nproc_per_node", "--nodes"}
        if program in ("train.py", "trainer.generate", "trainer.export", "launch", "bench", "trainer.data.prepare", "bench.data",
                       "bench.planner"):
            accepted = _help(program, capsys)
            assert all(flag in accepted for flag in flags), (command, flags)
        return
    train_run = _train_args(command)
    if train_run is not None and "--calibrate" in train_run[0]:  # measures the machine for ~75 s: its flags parse
        train.parse_args(train_run[0])
        return
    if train_run is not None:
        args, ranks = train_run
        if "--plan" in args:  # runs as written: planning needs no data, no GPU (datasheet profiles)
            extra = []
        elif "--dry-run" in args or "--check" in args:
            extra = [] if "--world-size" in args else ["--world-size", str(ranks)]
        else:
            extra = ["--check", "--world-size", str(ranks), "--for-another-machine", *_cpu_sized(args)]
        code = train.main([*args, *extra, f"job.output_dir={tmp_path / 'run'}"])
        err = capsys.readouterr().err.strip().splitlines()
        if error is not None:
            assert code == 2 and err[-1] == error, err[-3:]
        else:
            assert code == 0, err[-3:]
        return
    words = shlex.split(command)
    if program == "bench":
        import bench.__main__ as bench_main

        bench_main.parse_args(words[words.index("bench") + 1:])
    elif program == "trainer.data.prepare":  # its arguments and the config it reads (it tokenizes in tests/unit)
        from trainer.config import load_config
        from trainer.data.prepare import parse_args

        parsed = parse_args(words[words.index(program) + 1:])
        load_config(parsed.config, parsed.overrides)
    elif program == "bench.data":  # measured in docs/data.md
        from bench.data import parse_args

        parse_args(words[words.index(program) + 1:])
    elif program in ("bench.attention", "bench.long_context", "bench.moe", "bench.qat", "bench.planner"):
        import importlib

        importlib.import_module(program).parse_args(words[words.index(program) + 1:])
    elif words[0] == "bash" and words[1].startswith("examples/"):  # an example script: it exists and parses
        import subprocess

        assert subprocess.run(["bash", "-n", words[1]], cwd=REPO).returncode == 0, words[1]
    elif words[:2] == ["bash", "scripts/gpu_acceptance.sh"]:
        from bench.acceptance import main as acceptance

        assert acceptance([*words[2:], "--dry", "--out", str(tmp_path)]) == 0
    elif program == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)
        assert words[1] in targets, (words[1], targets)
    elif program == "pytest":
        files = [REPO / w for w in words if w == "tests" or w.startswith("tests/")]
        assert files and all(f.exists() for f in files), files
        files = [f for f in files if f.is_file()]
        if "-k" in words:
            names = {n for f in files for n in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
            assert any(words[words.index("-k") + 1] in n for n in names), (command, sorted(names))
    else:
        pytest.fail(f"{where}: no rule runs `{command}`: add one to this test")
