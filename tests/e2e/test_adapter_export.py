"""A trained adapter, exported in PEFT's format, loads with peft onto the exported base and gives the
same logits as the merged export (which transformers loads on its own); `python -m trainer.export` of the
run's checkpoint later writes the same files."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from tests.helpers import run_train


@pytest.mark.parametrize("kind,nproc,layout", [
    ("dora", 2, ["parallel.dp_shard=2"]), ("lora", 1, []),
    # Pipeline stages: rank 0 rebuilds the model from model.init_from (here the seeded init) and the
    # final adapter checkpoint.
    ("lora", 2, ["parallel.pp=2", "checkpoint.enabled=true"]),
], ids=["dora-fsdp", "lora", "lora-pp"])
def test_peft_export_equals_merged_export(tmp_path, kind, nproc, layout):
    result = run_train([
        "--config", "configs/debug.yaml", "training.steps=4", f"adapters.kind={kind}", "adapters.rank=4",
        "optimizer.lr=1e-2", "export.hf=true", "export.peft=true", "export.dtype=float32", "checkpoint.enabled=false",
        *layout, f"job.output_dir={tmp_path}",
    ], nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "export"
    config = json.loads((export / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == (kind == "dora") and "model.layers.0.self_attn.q_proj" in config["target_modules"]

    base = LlamaForCausalLM.from_pretrained(export / "base").eval()
    tokens = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(tokens).logits.clone()
        with_adapter = PeftModel.from_pretrained(base, export / "peft").eval()(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(export / "hf").eval()(tokens).logits
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the trained adapter changes the model
    assert (with_adapter - merged).abs().max() < 1e-4

    if "checkpoint.enabled=true" in layout:
        _later_exports_equal_the_runs(tmp_path)


def _later_exports_equal_the_runs(run):
    from trainer.cli import run_command
    from trainer.export import main as export

    assert run_command(export, [str(run), str(run / "later-merged"), "--dtype", "float32"]) == 0
    assert run_command(export, [str(run / "checkpoints" / "step-4"), str(run / "later"), "--dtype", "float32", "--peft"]) == 0
    for ours, later in (("hf", "later-merged"), ("base", "later/base")):
        a, b = load_file(run / "export" / ours / "model.safetensors"), load_file(run / later / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), ours
    a, b = (load_file(d / "adapter_model.safetensors") for d in (run / "export" / "peft", run / "later" / "peft"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((run / "later" / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "later" / "base").resolve())
