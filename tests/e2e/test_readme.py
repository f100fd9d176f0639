"""The README, followed to the letter: its shell commands run in order, as a user would type them, in a
fresh copy of the repository (one output tree for all of them), with the virtual environment that
`make` made activated as the README says. Each does what the README says it does."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, _shared
from tests.helpers import REPO, tensorboard_scalars

README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The commands of the README's ```sh blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and line != "make test":  # the suite itself
                commands.append(" ".join(line.split()))
    return commands


def _fresh_copy(tmp: Path) -> Path:
    """The repository's files as a clone has them, with ../shared beside it and the venv already made."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    repo = tmp / "tessera"
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    (tmp / "shared").symlink_to(SHARED_DATA.parent)
    (repo / ".venv").symlink_to(REPO / ".venv")
    return repo


def _run(command: str, repo: Path) -> subprocess.CompletedProcess:
    venv = repo / ".venv"
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", "-c", command], cwd=repo, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    _shared("models/stories260K/stories260K.bin")  # skips (or fails under CI) without the shared data
    repo = _fresh_copy(tmp_path_factory.mktemp("readme"))
    results = {}
    for command in readme_commands():
        results[command] = _run(command, repo)
    results["make train (again)"] = _run("make train", repo)
    return repo, results


def _find(results, needle: str) -> subprocess.CompletedProcess:
    matches = [r for c, r in results.items() if needle in c]
    assert len(matches) == 1, f"the README has {len(matches)} commands with {needle!r}"
    return matches[0]


def test_the_readme_has_the_walkthrough():
    commands = readme_commands()
    assert commands[0] == "make train" and "source .venv/bin/activate" in commands
    assert len(commands) >= 6


def test_every_command_succeeds(walkthrough):
    _, results = walkthrough
    for command, result in results.items():
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stdout + result.stderr, command


def test_default_run_reports_progress_and_honest_mfu(walkthrough):
    repo, results = walkthrough
    out = results["make train"].stdout
    lines = [line for line in out.splitlines() if line.startswith("step ") and "| loss" in line]
    assert len(lines) == 21  # steps 1, 10, ..., 200
    mfu = [float(re.search(r"mfu\s+([\d.]+)%", line).group(1)) for line in lines]
    assert all(0 < m <= 100 for m in mfu), mfu
    assert "MFU against" in out and "approximate" in out
    assert re.search(r"tokens 409.60K \| elapsed \d+:\d\d:\d\d \| eta 0:00:00$", lines[-1]), lines[-1]
    run = repo / "outputs" / "debug"
    loss = tensorboard_scalars(run, "loss/train")
    assert set(loss) == {1, *range(10, 201, 10)}
    # A byte-level model starts near ln(259) = 5.56 nats; it must fall well below it.
    assert loss[1] > 5.0 and loss[200] < 0.5 * loss[1], loss
    assert max(loss[s] for s in range(150, 201, 10)) < min(loss[s] for s in (10, 20, 30))
    for tag in ("lr", "grad_norm", "throughput/tokens_per_sec_per_device", "throughput/mfu_percent", "memory/peak_gib"):
        assert len(tensorboard_scalars(run, tag)) == 21, tag
    for word in ("loss", "lr", "grad_norm", "tok/s/device", "mfu", "mem", "ms (data"):  # every metric the brief names
        assert word in lines[-1]
    assert tensorboard_scalars(run, "progress/tokens_seen")[200] == 200 * 2048
    assert tensorboard_scalars(run, "time/eta_seconds")[200] == 0
    assert tensorboard_scalars(run, "time/elapsed_seconds")[200] > tensorboard_scalars(run, "time/elapsed_seconds")[10]


def test_a_finished_run_says_there_is_nothing_to_train(walkthrough):
    repo, results = walkthrough
    again = results["make train (again)"].stdout
    assert "nothing to train: outputs/debug holds a checkpoint at step 200, and training.steps=200" in again
    starts = sorted(p.name for p in (repo / "outputs" / "debug" / "starts").iterdir())
    assert starts == ["001-from-step-0.yaml"]  # the second start trained nothing and wrote nothing


def test_each_example_has_its_own_output_dir(walkthrough):
    repo, results = walkthrough
    two_ranks = _find(results, "launch local --nproc 2")
    assert "launch: 2 process(es), OMP_NUM_THREADS=" in two_ranks.stdout
    assert "check: ok: outputs/debug-2ranks on 2 rank(s)" in two_ranks.stdout
    assert "resumed from" not in two_ranks.stdout
    assert (repo / "outputs" / "debug-2ranks" / "checkpoints" / "step-20").is_dir()
    lora = _find(results, "adapters.kind=lora")
    assert "resumed from" not in lora.stdout and (repo / "outputs" / "stories260k-lora" / "checkpoints" / "step-60").is_dir()


def test_dry_run_counts_what_trains(walkthrough):
    _, results = walkthrough
    plan = _find(results, "llama3_1_70b_qlora.yaml --dry-run").stdout
    assert "parameters total: 70,760,800,256" in plan and "parameters trainable: 207,093,760" in plan
    assert "parameters total: 820,352" in _find(results, "debug.yaml --dry-run").stdout


def test_exports_are_named_and_usable_alone(walkthrough):
    repo, results = walkthrough
    export = repo / "outputs" / "stories260k-lora" / "export"
    out = _find(results, "adapters.kind=lora").stdout
    for line in ("export: outputs/stories260k-lora/export/peft: PEFT adapter over outputs/stories260k-lora/export/base",
                 "export: outputs/stories260k-lora/export/base: Hugging Face checkpoint of the frozen base",
                 "export: outputs/stories260k-lora/export/hf: Hugging Face checkpoint, adapters merged"):
        assert line in out, out[-3000:]
    config = json.loads((export / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((export / "base").resolve())

    import sentencepiece
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder in ("base", "hf", "peft"):
        assert {"tokenizer.model", "tokenizer_config.json"} <= {p.name for p in (export / folder).iterdir()}
        tokenizer = AutoTokenizer.from_pretrained(export / folder)
        reference = sentencepiece.SentencePieceProcessor(model_file=str(export / folder / "tokenizer.model"))
        assert tokenizer("Once upon a time", add_special_tokens=False).input_ids == reference.encode("Once upon a time")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    PeftModel.from_pretrained(base, export / "peft")  # the base named in the adapter's config takes it


def test_sampling_continues_the_prompt(walkthrough):
    _, results = walkthrough
    text = _find(results, "python -m trainer.generate outputs/stories260k-lora --prompt").stdout
    assert text.startswith("Once upon a time") and len(text.split()) > 8, text
    # The adapter merged into its base samples what the run's own checkpoint does.
    assert _find(results, "python -m trainer.generate outputs/stories260k-lora/export/peft").stdout == text


def test_every_export_generates_what_transformers_and_peft_generate(walkthrough):
    """Greedy, from each export directory: our sampler (through the command's own loader) and transformers'
    `generate` (with peft over the base it names for export/peft), each with the export's own tokenizer."""
    import stat

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.generate import Sampling, generate, load_for_generation, prompt_ids

    repo, _ = walkthrough
    export = repo / "outputs" / "stories260k-lora" / "export"
    for folder in ("hf", "base", "peft"):
        model, tokenizer = load_for_generation(export / folder)
        ours = generate(model, prompt_ids(tokenizer, "Once upon a time", chat=False), Sampling(max_new_tokens=24),
                        stop_ids=(tokenizer.eos_id,))
        theirs_tokenizer = AutoTokenizer.from_pretrained(export / folder)
        ids = theirs_tokenizer("Once upon a time", return_tensors="pt").input_ids
        assert ids[0].tolist() == prompt_ids(tokenizer, "Once upon a time", chat=False), folder  # BOS as in training
        if folder == "peft":
            config = json.loads((export / "peft" / "adapter_config.json").read_text())
            theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                               export / "peft")
        else:
            theirs = AutoModelForCausalLM.from_pretrained(export / folder)
        with torch.no_grad():
            # In float32 as ours computes (the export holds bf16 weights, which both read alike).
            out = theirs.float().eval().generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.eos_id)
            # On their whole greedy sequence, both models give the same next-token logits...
            their_logits, our_logits = theirs(out).logits[0].float(), model(out)[0].float()
        assert (their_logits - our_logits).abs().max() < 1e-4, folder
        # ...and the same greedy tokens, up to a near tie (peft adds the adapter's product to the base's,
        # we merge it into the weights first: the two round differently, by ~1e-6).
        theirs_new, start = out[0, ids.shape[1]:].tolist(), ids.shape[1] - 1
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs_new)) if a != b), min(len(ours), len(theirs_new)))
        assert len(ours) > 5 and agree >= min(len(ours), len(theirs_new)) or \
            float(our_logits[start + agree].topk(2).values.diff().abs()) < 1e-4, (folder, agree, ours, theirs_new)
        for path in (export / folder).iterdir():  # readable by the others on a shared machine (umask 022)
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
