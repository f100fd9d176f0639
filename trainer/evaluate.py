"""Held-out loss of a model on one device (examples and checks, not the loop); text: trainer/generate.py."""

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
