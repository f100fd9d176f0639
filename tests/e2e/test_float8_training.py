"""Float8 training end to end on CPU (torchao's emulation: float8 numerics in high precision): it trains
as well as high precision, resumes bitwise after kill -9, resumes with float8 off, exports checkpoints
that transformers loads, and carries LoRA adapters whose PEFT export loads in peft."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.helpers import kill_9_and_resume, run_train, tensorboard_scalars

pytest.importorskip("torchao")

FP8 = ["fp8.enabled=true", "fp8.emulate=true"]


def test_fifty_steps_of_float8_end_within_3_percent_of_high_precision(tmp_path):
    common = ["--config", "configs/debug.yaml", "training.steps=50", "metrics.log_every=1", "checkpoint.enabled=false"]
    final = {}
    runs = {"fp32": [], "tensorwise": FP8, "rowwise": [*FP8, "fp8.recipe=rowwise"]}
    # The three at once, a thread each: on two cores that takes two thirds of running them in turn.
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = {name: pool.submit(run_train, [*common, *extra, f"job.output_dir={tmp_path / name}"],
                                     env={"OMP_NUM_THREADS": "1"}) for name, extra in runs.items()}
    for name, extra in runs.items():
        result = results[name].result()
        assert result.returncode == 0, result.stderr[-3000:]
        final[name] = tensorboard_scalars(tmp_path / name, "loss/train")[50]
        if extra:
            assert "28 of 29 linear layers convert" in result.stdout and "mfu_mixed" in result.stdout
    print(f"\nFLOAT8 loss at step 50: {final}")
    for recipe in ("tensorwise", "rowwise"):
        assert abs(final[recipe] - final["fp32"]) / final["fp32"] < 0.03, final
    assert final["fp32"] < 3.5  # and the runs did train


ARGS = ["--config", "configs/debug.yaml", "training.steps=12", "metrics.log_every=1", "checkpoint.interval=4",
        "job.deterministic=true", "optimizer.name=adamw_8bit", *FP8, "fp8.fsdp_float8_all_gather=true", "training.local_batch_size=1"]


def test_float8_resumes_bitwise_and_without_float8(tmp_path):
    """FSDP2 on 2 ranks gathering float8 weights, whose scales are computed after each optimizer step (and
    at start-up, so that a resumed run scales its first step as an uninterrupted one does), with 8-bit
    AdamW moments (restored with their block scales, then requantized on one process)."""
    reference = run_train([*ARGS, "export.hf=true", f"job.output_dir={tmp_path / 'ref'}"], nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    kill_9_and_resume(ARGS, out, tmp_path / "ref", nproc=2, checkpoint_step=4, compare=range(9, 13))

    # The checkpoint holds high-precision weights under the plain names: it resumes with float8 off, on
    # one process.
    off = run_train([*ARGS[:-4], "training.local_batch_size=1", "training.steps=14", f"job.output_dir={out}"])
    assert off.returncode == 0, off.stderr[-3000:]
    assert "resumed from" in off.stdout and "linear layers convert" not in off.stdout
    losses = tensorboard_scalars(out, "loss/train")
    assert abs(losses[13] - losses[12]) < 0.5

    # The export is a plain bf16 Hugging Face checkpoint that transformers loads and runs.
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "ref" / "export" / "hf").eval()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    from safetensors import safe_open

    for path in (tmp_path / "ref" / "export" / "hf").glob("*.safetensors"):
        with safe_open(str(path), "pt") as tensors:
            assert {tensors.get_tensor(k).dtype for k in tensors.keys()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(torch.randint(0, 259, (1, 32), generator=torch.Generator().manual_seed(0))).logits
    assert torch.isfinite(logits).all()


def test_lora_over_a_float8_base_trains_and_exports_for_peft(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    result = run_train([
        "--config", "configs/debug.yaml", "training.steps=20", "metrics.log_every=1", "adapters.kind=lora",
        "adapters.rank=4", "optimizer.lr=1e-2", "export.peft=true", "checkpoint.enabled=false", *FP8,
        f"job.output_dir={tmp_path}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "28 of 29 linear layers convert" in result.stdout
    losses = tensorboard_scalars(tmp_path, "loss/train")
    print(f"\nLoRA over float8: loss {losses[1]:.4f} -> {losses[20]:.4f}")
    assert losses[20] < losses[1] - 1.0

    export = tmp_path / "export"
    config = json.loads((export / "peft" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    base = LlamaForCausalLM.from_pretrained(export / "base").eval()
    tokens = torch.randint(0, 259, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(tokens).logits.clone()
        with_adapter = PeftModel.from_pretrained(base, export / "peft").eval()(tokens).logits
    assert torch.isfinite(with_adapter).all()
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the trained adapter changes the model


def test_float8_benchmark_runs_every_row_emulated(tmp_path):
    """python -m bench's float8 rows at the tiny preset, emulated, eagerly and briefly, so that they cannot
    rot; their timings are printed, never asserted."""
    import subprocess
    import sys

    from tests.helpers import REPO

    result = subprocess.run([sys.executable, "-m", "bench", "--preset", "tiny", "--variants", "float8", "--no-compile",
                             "--steps", "4", "--warmup", "2", "--pairs", "1", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "bench.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| row")]
    assert len(rows) == 4 and not any("failed" in row for row in rows), result.stdout
    # The float8 rows report their share of float8 FLOPs and the mixed-peak MFU; high precision has none.
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[7] == "-" for c in cells] == [True, True, False, False], result.stdout
    assert all(float(c[7].rstrip(" %")) > 50 for c in cells[2:]), result.stdout
