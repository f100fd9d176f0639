"""QAT end to end: a run that switches fake quantization on mid-way (with 4-bit optimizer moments) resumes
bitwise after kill -9, resumes
with QAT off, and exports W4A16 / W8A8-int8 / W8A8-float8 checkpoints in compressed-tensors' format that
transformers loads back on this CPU and that compute exactly what our own quantized model computes (and
our loader reads them back as transformers does)."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers import kill_9_and_resume, run_train, tensorboard_scalars
from trainer.build import load_run_model
from trainer.evaluate import held_out_loss
from trainer.config.schema import QATConfig
from trainer.generate import Sampling, generate
from trainer.qat.export import FORMATS, quantized_model
from trainer.weights.load import load_model

pytest.importorskip("torchao")
pytest.importorskip("compressed_tensors")

# Validation after the last step (every run: the held-out documents are taken from the training ones): the
# rounded model's loss, its high-precision self's, and the W4A16 export's.
EVAL = ["eval.every=10", "eval.split_fraction=0.1", "eval.steps=1", "eval.quantized=[w4a16]"]
# Plain for 5 steps, rounding from step 6: the kill comes after the step-4 checkpoint, so the resumed run
# must switch rounding on at the same step as the uninterrupted one. With 4-bit AdamW moments, restored
# with their block scales (issue 25's kill -9 of that choice).
ARGS = ["--config", "configs/debug.yaml", "training.steps=10", "metrics.log_every=1", "checkpoint.interval=4",
        "job.deterministic=true", "qat.scheme=int8_dynact_int4_weight", "qat.start_step=5", "qat.head=true", *EVAL,
        "optimizer.name=adamw_4bit"]
EXPORTS = ["export.dtype=float32", "export.hf=true", "export.quantized=[w4a16,w8a8_int8,w8a8_fp8]"]


def _linear_bytes(export_dir, quantized: bool) -> int:
    """Bytes of the linear layers' stored weights (with their scales) in an export."""
    total = 0
    for path in export_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as tensors:
            for key in tensors.keys():
                linear = "proj" in key or key.startswith("lm_head")
                if linear and (quantized or key.endswith(".weight")):
                    t = tensors.get_tensor(key)
                    total += t.numel() * (2 if not quantized else t.element_size())  # the plain one in bf16
    return total


def test_qat_resumes_bitwise_and_its_quantized_exports_load_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    reference = run_train([*ARGS, *EXPORTS, f"job.output_dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "29 layers fake-quantized from step 6" in reference.stdout
    out = tmp_path / "run"
    kill_9_and_resume(ARGS, out, tmp_path / "ref", nproc=1, checkpoint_step=4, compare=range(5, 11))

    # The checkpoints hold plain weights: the run goes on with QAT off.
    off = run_train([*ARGS, "qat.scheme=none", "eval.every=0", "eval.quantized=[]", "training.steps=12", f"job.output_dir={out}"])
    assert off.returncode == 0 and "resumed from" in off.stdout and "fake-quantized" not in off.stdout, off.stderr[-3000:]

    export = tmp_path / "ref" / "export"
    final = load_model(export / "hf", "cpu")  # float32: the weights the run ended with

    # Each validation figure against a separate forward of the model it names, over the same windows.
    run = tmp_path / "ref"
    for tag, model in (("eval/loss", load_run_model(run / "checkpoints" / "step-10")), ("eval/loss_high_precision", final),
                       ("eval/loss_w4a16", quantized_model(final, FORMATS["w4a16"].scheme, QATConfig(head=True)))):
        logged, separate = tensorboard_scalars(run, tag)[10], held_out_loss(run, model)
        print(f"\nQAT {tag}: logged {logged:.6f}, separate forward {separate:.6f}")
        assert abs(logged - separate) < 1e-5

    prompt = list(range(40, 72))
    sizes = {}
    for name, fmt in FORMATS.items():
        config = json.loads((export / name / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["ignore"] == [] and \
            config["config_groups"]["group_0"]["weights"]["num_bits"] == (4 if name == "w4a16" else 8)
        theirs = AutoModelForCausalLM.from_pretrained(export / name, dtype=torch.float32).eval()
        ours = quantized_model(final, fmt.scheme, QATConfig(head=True))
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            difference = (theirs(tokens).logits - ours(tokens)).abs().max().item()
            rounding = (ours(tokens) - final(tokens)).abs().max().item()
            continued = theirs.generate(tokens, max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        assert continued == generate(ours, prompt, Sampling(max_new_tokens=24))
        # Our own loader (python -m trainer.generate, model.init_from) reads it back as the served model.
        with torch.no_grad():
            assert (load_model(export / name, "cpu")(tokens) - ours(tokens)).abs().max() < 1e-5
        sizes[name] = _linear_bytes(export / name, quantized=True)
        print(f"\nQAT export {name}: max |transformers - ours| = {difference:.1e} (rounding moved the logits "
              f"{rounding:.2f}), linear weights {sizes[name]} bytes")
        assert difference < 1e-4 and rounding > 1e-3
    bf16 = _linear_bytes(export / "hf", quantized=False)
    print(f"QAT export sizes of the linear weights against bf16 ({bf16} bytes): "
          + ", ".join(f"{n} {s / bf16:.3f}x" for n, s in sizes.items()))
    assert sizes["w4a16"] <= 0.3 * bf16


MOE = ["--config", "configs/debug.yaml", "model.flavor=qwen3_moe_debug", "training.steps=6", "metrics.log_every=2",
       "qat.scheme=int8_dynact_int4_weight", "qat.group_size=16", "eval.every=6", "eval.split_fraction=0.1", "eval.steps=1",
       "eval.quantized=[w4a16]", *EXPORTS]


def test_qat_rounds_stacked_experts_and_their_exports_load_per_expert(tmp_path):
    """A mixture's experts train rounded (each expert as a linear layer) and export one expert at a time, as
    Hugging Face checkpoints hold them. transformers 5 reads them into its fused experts, dequantized: W4A16
    in bfloat16 (its decompression multiplies in the scales' dtype), float8 exactly, but without rounding
    the experts' inputs (they are not Linear modules, which its compressed-tensors path simulates), and
    int8 experts not at all (it decompresses packed and float8 experts only); our loader reads all three
    as served."""
    from transformers import AutoModelForCausalLM

    result = run_train([*MOE, f"job.output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20 layers fake-quantized (4 of them stacked experts" in result.stdout
    export, qat = tmp_path / "export", QATConfig(group_size=16)
    final = load_model(export / "hf", "cpu")
    logged = tensorboard_scalars(tmp_path, "eval/loss_w4a16")[6]
    assert abs(logged - held_out_loss(tmp_path, quantized_model(final, FORMATS["w4a16"].scheme, qat))) < 1e-5

    prompt = list(range(40, 72))
    tokens = torch.tensor([prompt])
    for name, fmt in FORMATS.items():
        with safe_open(str(export / name / "model.safetensors"), "pt") as tensors:
            stored = {k for k in tensors.keys() if ".mlp.experts.3.down_proj." in k and k.startswith("model.layers.1.")}
        suffixes = {"weight_packed", "weight_scale", "weight_shape"} if name == "w4a16" else {"weight", "weight_scale"}
        assert stored == {f"model.layers.1.mlp.experts.3.down_proj.{s}" for s in suffixes}
        ours = quantized_model(final, fmt.scheme, qat)
        with torch.no_grad():
            rounding = (ours(tokens) - final(tokens)).abs().max().item()
            assert (load_model(export / name, "cpu")(tokens) - ours(tokens)).abs().max() < 1e-5 and rounding > 1e-3
        if name == "w8a8_int8":
            continue
        theirs = AutoModelForCausalLM.from_pretrained(export / name, dtype=torch.float32).eval()
        experts = ours.layers["1"].moe.experts
        expected = torch.cat([experts.round_weight(experts.w1), experts.round_weight(experts.w3)], dim=1).detach()
        if name == "w4a16":
            expected = expected.bfloat16().float()
        else:
            for block in ours.layers.values():
                block.moe.experts.rounding.inputs = lambda x: x
        assert torch.equal(theirs.model.layers[1].mlp.experts.gate_up_proj, expected)
        with torch.no_grad():
            difference = (theirs(tokens).logits - ours(tokens)).abs().max().item()
            continued = theirs.generate(tokens, max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
        print(f"\nQAT MoE export {name}: max |transformers - ours| = {difference:.1e} (rounding moved the logits {rounding:.2f})")
        assert difference < (2e-3 if name == "w4a16" else 1e-5)
        assert continued == generate(ours, prompt, Sampling(max_new_tokens=24))
