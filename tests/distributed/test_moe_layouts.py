"""Qwen3-MoE under expert parallelism and the other layouts, against one fp32 process (the oracle): the
same losses and gradient norms within 1e-5 over 4 steps, with the load-balancing loss on.

The loss balances each round of microbatches over all data-parallel ranks together (global-batch
balancing, trainer/expert_balance.py), so the single process takes the global batch of 8 sequences as one
microbatch and every layout's round is the same 8. DeepSeek-V3-style routing (sigmoid, groups, a shared
expert, a first dense layer, the balancing bias) runs its own reference: its bias moves after every step
from the loads of all ranks, so the layouts must agree on those too. On ep 2 it is held to one process by
the resume test below (its checkpoint resumed on one process). The ep 2 run trains LoRA over the experts,
the router and attention (its own reference) and exports it, merged and as peft's adapter; the ep x tp run
trains with QAT over the experts (its own reference too)."""

import pytest
import torch

from tests.helpers import (document_attention, kill_9_and_resume, layout_runner, run_train, tensorboard_scalars,
                           tensorboard_tags)

STEPS = 4
COMMON = ["--config", "configs/debug.yaml", f"training.steps={STEPS}", "metrics.log_every=1", "checkpoint.interval=2"]
MOE, DSV3 = ["model.flavor=qwen3_moe_debug"], ["model.flavor=qwen3_moe_debug_dsv3", "moe.bias_update_rate=0.01"]
LORA = ["adapters.kind=lora", "adapters.targets=[experts,router,q,v]", "adapters.dropout=0"]
# QAT of every block's linear layers and each expert (int4 weights; the lower learning rate keeps the
# weights off rounding boundaries that tp's other summation order could cross, as in test_parity_matrix).
QAT = ["qat.scheme=int4_weight_only", "qat.group_size=16", "optimizer.lr=3e-4"]
# name -> (ranks, overrides). The global batch stays 8 sequences; the single process takes it whole.
LAYOUTS = {
    "ep=2, LoRA over the experts": (
        2, [*MOE, *LORA, "parallel.ep=2", "export.hf=true", "export.peft=true", "export.dtype=float32"]),
    "dp_shard=2 x ep=2 x tp=2 (experts over 4 ranks), selective_op AC, QAT": (
        4, [*MOE, *QAT, "parallel.ep=2", "parallel.tp=2", "training.local_batch_size=4",
            "activation_checkpoint.mode=selective_op"]),
    "cp=2 x dp_shard=2 x ep=2, full AC, document": (4, [*MOE, "parallel.cp=2", "parallel.ep=2", "activation_checkpoint.mode=full"]),
    "pp=2, dsv3": (2, [*DSV3, "parallel.pp=2", "training.local_batch_size=8"]),
}


def _reference_key(layout: str) -> tuple[str, bool]:
    flavor = "dsv3" if "dsv3" in layout else "lora" if "LoRA" in layout else "qat" if "QAT" in layout else "moe"
    return (flavor, layout.endswith("document"))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    runs = {}

    def reference(layout: str):
        key = _reference_key(layout)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"single-{key[0]}")
            flavor = {"dsv3": DSV3, "lora": [*MOE, *LORA], "qat": [*MOE, *QAT], "moe": MOE}[key[0]]
            result = run_train([*COMMON, f"job.output_dir={out}", *flavor, "training.local_batch_size=8",
                                *(document_attention() if key[1] else [])])
            assert result.returncode == 0, result.stderr[-3000:]
            runs[key] = {tag: tensorboard_scalars(out, tag) for tag in ("loss/train", "grad_norm", "moe/load_max_over_mean")}
        return runs[key]

    return reference


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    return layout_runner(tmp_path_factory, LAYOUTS, COMMON)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(references, layout_run, layout):
    reference, out = references(layout), layout_run(layout)
    got = {tag: tensorboard_scalars(out, tag) for tag in reference}
    assert sorted(got["loss/train"]) == list(range(1, STEPS + 1))
    worst = max(abs(got["loss/train"][s] - reference["loss/train"][s]) for s in range(1, STEPS + 1))
    worst_norm = max(abs(got["grad_norm"][s] - reference["grad_norm"][s]) / reference["grad_norm"][s]
                     for s in range(1, STEPS + 1))
    print(f"\nMOE PARITY {layout}: max |loss - single| = {worst:.2e}, max relative grad-norm diff = {worst_norm:.2e}")
    assert worst < 1e-5 and worst_norm < 1e-5
    # The expert loads every rank logs are those of the whole step (reduced over the ranks), per MoE layer too.
    assert got["moe/load_max_over_mean"] == pytest.approx(reference["moe/load_max_over_mean"], abs=1e-6)
    tags = set(tensorboard_tags(out))
    moe_layers = [1, 2, 3] if "dsv3" in layout else [0, 1, 2, 3]
    assert {f"moe/load_max_over_mean/layer_{i}" for i in moe_layers} | {"moe/router_entropy"} <= tags
    assert ("moe/aux_loss" in tags) == ("pp=" not in layout)


RESUME = ["--config", "configs/debug.yaml", "training.steps=12", "metrics.log_every=1", "checkpoint.interval=4", *DSV3,
          "parallel.ep=2", "job.deterministic=true"]


def test_kill_9_on_ep2_resumes_bitwise_and_its_checkpoint_reshards_to_one_rank(tmp_path):
    """ep=2 with the balancing bias: killed after its step-4 checkpoint and resumed, the losses of steps 5-12
    equal the uninterrupted run's bit for bit, and so do the final weights and expert biases; the step-4
    checkpoint also resumes on one process (ep 1, dp 1), within 1e-5."""
    from trainer.build import load_run

    reference = tmp_path / "ref"
    result = run_train([*RESUME, f"job.output_dir={reference}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    kill_9_and_resume(RESUME, tmp_path / "killed", reference, nproc=2, checkpoint_step=4, compare=range(5, 13))
    want, got = load_run(reference).state_dict(), load_run(tmp_path / "killed").state_dict()
    biases = [name for name in want if name.endswith("expert_bias")]
    assert len(biases) == 3 and any(want[name].abs().sum() > 0 for name in biases)  # layers 1-3; they moved
    assert all(torch.equal(want[name], got[name]) for name in want)

    single = tmp_path / "single"
    step4 = reference / "checkpoints" / "step-4"
    resharded = run_train([*RESUME[:-2], "job.deterministic=true", "training.local_batch_size=8",
                           f"checkpoint.resume_from={step4}", f"job.output_dir={single}"])
    assert resharded.returncode == 0, resharded.stderr[-3000:]
    ref_loss, one = tensorboard_scalars(reference, "loss/train"), tensorboard_scalars(single, "loss/train")
    worst = max(abs(one[s] - ref_loss[s]) for s in range(5, 13))
    print(f"\nMOE RESUME ep2 -> one process: max |loss diff| steps 5-12 = {worst:.2e}")
    assert worst < 1e-5


def test_an_ep2_run_exports_what_transformers_and_peft_load(layout_run):
    """export.hf and export.peft from expert-parallel ranks (each stacked expert tensor gathered whole): the
    merged export, one tensor per expert, loads in transformers' Qwen3MoeForCausalLM, and peft's adapter
    (LoRA over every expert as its target_parameters) loads over the base export; both give the logits of
    the run's last checkpoint."""
    from peft import PeftModel
    from transformers import Qwen3MoeForCausalLM

    from trainer.build import load_run

    out = layout_run("ep=2, LoRA over the experts")
    export = out / "export"
    ours = load_run(out)
    tokens = torch.randint(0, ours.args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    merged = Qwen3MoeForCausalLM.from_pretrained(export / "hf").float().eval()
    base = Qwen3MoeForCausalLM.from_pretrained(export / "base").float().eval()
    with torch.no_grad():
        logits = ours(tokens)
        diffs = {"merged": (merged(tokens).logits - logits).abs().max().item(),
                 "base": (base(tokens).logits - logits).abs().max().item()}  # before peft wraps `base` in place
        diffs["peft"] = (PeftModel.from_pretrained(base, export / "peft").eval()(tokens).logits - logits).abs().max().item()
    print(f"\nMOE EXPORT from ep 2 with LoRA over the experts: max |transformers - ours| = {diffs}")
    assert diffs["merged"] < 1e-5 and diffs["peft"] < 1e-5
    assert diffs["base"] > 1e-3  # the adapters trained
