"""Held-out loss of a model on one device (examples, checks and benchmarks, not the loop); text:
trainer/generate.py."""

from pathlib import Path

import torch
import torch.nn.functional as F

from models import Decoder


@torch.no_grad()
def per_token_loss(model: Decoder, sequences: list[list[int]]) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of every sequence."""
    total, count = 0.0, 0
    for seq in sequences:
        for start in range(0, len(seq) - 1, model.args.max_seq_len):
            chunk = torch.tensor(seq[start : start + model.args.max_seq_len + 1]).unsqueeze(0)
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return total / count


@torch.no_grad()
def held_out_loss(run_dir: Path, model: Decoder, dp: int = 1) -> float:
    """Mean cross-entropy of `model` over the held-out windows run `run_dir` validates on: the first
    eval.steps x dp x local_batch_size windows of its held-out stream (dp: the run's data-parallel size)."""
    from trainer.config import load_config
    from trainer.data import PackedLoader, load_documents
    from trainer.data.held_out import training_and_eval_documents
    from trainer.tokenizer import build_tokenizer

    cfg = load_config(Path(run_dir) / "config.yaml")
    _, held_out = training_and_eval_documents(cfg.data, cfg.eval, load_documents)
    loader = PackedLoader(held_out, build_tokenizer(cfg.tokenizer), cfg.data, cfg.training.seq_len,
                          dp * cfg.training.local_batch_size, dp_rank=0, dp_size=1, seed=cfg.job.seed)
    total, count = 0.0, 0
    for _ in range(cfg.eval.steps):
        inputs, labels, documents = loader.next_batch()
        logits = model(inputs, documents=documents if cfg.data.attention == "document" else None).float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100).item()
        count += int((labels >= 0).sum())
    return total / count
