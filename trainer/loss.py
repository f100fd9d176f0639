"""The training loss: summed next-token cross-entropy, scaled so that a step's gradient is that of the
mean over every label token of the global batch (whatever the split into ranks and microbatches).

Chunked (a `head`): the model hands over its final hidden states, and the loss projects them onto the
vocabulary itself, over the label tokens only, a chunk at a time, computing each chunk's gradients
while its logits exist. So no full-vocabulary logits exist for the whole batch, in any dtype (at Llama
3's 128k vocabulary, 8k tokens of fp32 logits are 4 GiB, their gradient as much again)."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class TokenLoss:
    """Called once per microbatch (by the trainer, or by a pipeline schedule on the last stage)."""

    def __init__(self, head: Callable[[], torch.Tensor] | None = None, chunk_tokens: int = 1024):
        """`head`: returns the output projection's weight; given, the loss takes hidden states, not logits."""
        self.scale = 1.0
        self.summed = torch.zeros(())
        self.head, self.chunk_tokens = head, chunk_tokens

    @staticmethod
    def count(labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_INDEX).sum()

    def start(self, scale: float, device: torch.device) -> None:
        """Begins an optimizer step: `scale` turns a summed loss into this step's share of the mean."""
        self.scale = scale
        self.summed = torch.zeros((), device=device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None,
                 documents: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled loss of one microbatch, to call backward on (`inputs` and `documents` serve losses
        that run a model of their own: distillation's teacher).
        With a head, `logits` are the final hidden states."""
        if self.head is not None:
            return chunked_cross_entropy(logits, self.head(), labels, self.chunk_tokens) * self.scale
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        )
        return loss_sum * self.scale

    def plain(self) -> "TokenLoss":
        """The loss validation measures: this one."""
        return self

    def parts(self) -> dict[str, torch.Tensor]:
        """Named terms of the step's summed loss, logged beside it: none."""
        return {}

    def record(self, scaled: torch.Tensor) -> None:
        """Adds a microbatch's loss to the step's running sum. Kept apart from __call__ because a pipeline
        schedule also calls the loss once while it infers shapes, a call that must not be counted."""
        scaled = scaled.detach()
        # With loss parallelism the loss is a replicated DTensor; the running sum is kept plain.
        scaled = scaled.full_tensor() if hasattr(scaled, "full_tensor") else scaled
        self.summed += scaled / self.scale


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against targets, a chunk of rows at a time. The
    gradients are computed in the forward, chunk by chunk, while each chunk's logits exist (softmax minus
    the one-hot target, times the hidden rows or the weight), and kept for the backward: the same FLOPs
    as the whole-logits path, with nothing recomputed and one chunk's logits alive at a time. The logits
    are upcast to float32 as the plain path does; the matmuls run in the inputs' dtype."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.numel(), device=t.device)
            total += (lse - logits[rows, t]).sum()
            # d(loss)/d(logits): softmax - one_hot(target), in place of the logits.
            d_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            d_logits[rows, t] -= 1
            d_logits = d_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = d_logits @ weight
            if grad_weight is not None:
                grad_weight += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_output = grad_output.float()
        d_hidden = (grad_hidden * grad_output).to(grad_hidden.dtype) if grad_hidden is not None else None
        d_weight = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return d_hidden, d_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of hidden (batch, seq, dim) @ weight.T against labels, `chunk_tokens` label
    tokens at a time (masked tokens are skipped, not projected)."""
    kept = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
    hidden, targets = hidden.flatten(0, 1)[kept], labels.flatten()[kept]
    if torch.is_grad_enabled():
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
    # Validation: the loss alone, with no gradient work.
    return sum((F.cross_entropy(F.linear(hidden[i : i + chunk_tokens], weight).float(), targets[i : i + chunk_tokens],
                                reduction="sum") for i in range(0, targets.numel(), chunk_tokens)),
               torch.zeros((), device=hidden.device))
