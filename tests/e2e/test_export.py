"""Hugging Face exports from any layout load in transformers and agree with each other."""

import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from trainer.weights.load import load_model

from tests.helpers import REPO, run_train

COMMON = ["--config", "configs/debug.yaml", "training.steps=4", "export.hf=true"]


def test_pipeline_export_matches_single_process_export(tmp_path):
    single = run_train([*COMMON, "export.dtype=float32", f"job.output_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    piped = run_train([*COMMON, "export.dtype=float32", "parallel.pp=2", f"job.output_dir={tmp_path / 'pp'}"], nproc=2)
    assert piped.returncode == 0, piped.stderr[-3000:]
    a = LlamaForCausalLM.from_pretrained(tmp_path / "single" / "export" / "hf").eval()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "pp" / "export" / "hf").eval()
    tokens = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(tokens).logits - b(tokens).logits).abs().max() < 1e-4
        # transformers computes what we do with the exported weights.
        assert (a(tokens).logits - load_model(tmp_path / "single" / "export" / "hf")(tokens)).abs().max() < 1e-4

    # The command-line export of a checkpoint gives exactly the live export.
    cli = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "trainer.export", str(tmp_path / "single" / "checkpoints" / "step-4"),
         str(cli), "--dtype", "float32"], cwd=REPO, check=True, capture_output=True,
    )
    live = load_file(tmp_path / "single" / "export" / "hf" / "model.safetensors")
    exported = load_file(cli / "model.safetensors")
    assert live.keys() == exported.keys() and all(torch.equal(live[k], exported[k]) for k in live)


def test_bf16_export_from_two_fsdp_ranks(tmp_path):
    result = run_train([*COMMON, "export.dtype=bfloat16", f"job.output_dir={tmp_path}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    tensors = load_file(tmp_path / "export" / "hf" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model = LlamaForCausalLM.from_pretrained(tmp_path / "export" / "hf")
    assert model.config.num_hidden_layers == 4 and model.dtype == torch.bfloat16
