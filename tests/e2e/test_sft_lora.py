"""LoRA supervised finetuning of the real stories260K on real Alpaca records, through train.py."""

import pytest

from tests.helpers import run_train, stories260k_args, tensorboard_scalars


def test_lora_sft_of_stories260k_on_alpaca_lowers_the_loss(shared, tmp_path):
    result = run_train([
        "--config", "configs/debug.yaml", *stories260k_args(shared),
        f"data.source={shared('instruct/alpaca/alpaca_data_first2000.json')}", "data.task=sft",
        "data.skip_bad_records=true", "adapters.kind=lora", "adapters.rank=8", "optimizer.lr=3e-3",
        "training.steps=20", "metrics.log_every=1", "checkpoint.enabled=false", f"job.output_dir={tmp_path}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping 4 bad records" in result.stdout
    assert "training 46,240 of 306,272 parameters" in result.stdout  # only the adapters train
    loss = tensorboard_scalars(tmp_path, "loss/train")
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.4, loss


def test_qlora_sft_of_stories260k_exports_what_peft_loads(shared, tmp_path):
    """QLoRA (torchao NF4 base) on real Alpaca records: the loss falls, the PEFT export loaded by peft
    onto the HF export of the (dequantized) base gives the logits of the model we trained, and so does
    the merged export on its own."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from trainer.build import load_run
    from trainer.weights.errors import CheckpointError

    result = run_train([
        "--config", "configs/debug.yaml", *stories260k_args(shared),
        f"data.source={shared('instruct/alpaca/alpaca_data_first2000.json')}", "data.task=sft",
        "data.skip_bad_records=true", "adapters.kind=lora", "adapters.quantize_base=nf4", "adapters.rank=8",
        "optimizer.lr=3e-3", "training.steps=20", "metrics.log_every=1", "export.peft=true", "export.hf=true", "export.dtype=float32",
        "eval.split_fraction=0.05", "eval.every=20", "eval.steps=2", f"job.output_dir={tmp_path}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    loss = tensorboard_scalars(tmp_path, "loss/train")
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.4, loss

    with pytest.raises(CheckpointError, match=r"no complete checkpoint of step 7 \(there are: 20\)"):
        load_run(tmp_path, step=7)
    ours = load_run(tmp_path)  # the 4-bit base and the adapters of the final checkpoint
    assert type(ours.layers["0"].attention.wq.weight.data).__name__ == "NF4Tensor"
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    base = LlamaForCausalLM.from_pretrained(tmp_path / "export" / "base").eval()
    with torch.no_grad():
        our_logits = ours(tokens)
        base_logits = base(tokens).logits.clone()
        peft_logits = PeftModel.from_pretrained(base, tmp_path / "export" / "peft").eval()(tokens).logits
        merged_logits = LlamaForCausalLM.from_pretrained(tmp_path / "export" / "hf").eval()(tokens).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the trained adapter changes the model
    print(f"\nPARITY QLoRA stories260K: max |peft - ours| = {(peft_logits - our_logits).abs().max():.2e}, "
          f"max |merged - ours| = {(merged_logits - our_logits).abs().max():.2e}; loss {first:.4f} -> {last:.4f}")
    assert (peft_logits - our_logits).abs().max() < 1e-4
    assert (merged_logits - our_logits).abs().max() < 1e-4
    _check_sft_validation(tmp_path, ours)


def _check_sft_validation(run, model):
    """The validation loss of the final step is the cross-entropy of the assistant tokens alone of the
    held-out records, each record attending only to itself, through the 4-bit base and its adapters."""
    import torch
    import torch.nn.functional as F

    from trainer.config import load_config
    from trainer.data import PackedLoader, load_documents
    from trainer.data.held_out import training_and_eval_documents
    from trainer.loss import IGNORE_INDEX
    from trainer.tokenizer import build_tokenizer

    cfg = load_config(run / "config.yaml")
    tokenizer = build_tokenizer(cfg.tokenizer)
    _, held_out = training_and_eval_documents(cfg.data, cfg.eval, load_documents)
    loader = PackedLoader(held_out, tokenizer, cfg.data, cfg.training.seq_len, cfg.training.local_batch_size,
                          dp_rank=0, dp_size=1, seed=cfg.job.seed)
    total, count, masked = 0.0, 0, 0
    with torch.no_grad():
        for _ in range(cfg.eval.steps):
            # SFT keeps each record to itself (data.attention=auto is document for sft): so does this forward.
            inputs, labels, documents = loader.next_batch()
            logits = model(inputs, documents=documents)
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
            masked += int((labels == IGNORE_INDEX).sum())
    logged = tensorboard_scalars(run, "eval/loss")[20]
    print(f"EVAL SFT QLoRA: logged {logged:.6f}, separate forward {total / count:.6f} over {count} assistant tokens "
          f"({masked} prompt tokens masked)")
    assert masked > 0 and abs(logged - total / count) < 1e-5
