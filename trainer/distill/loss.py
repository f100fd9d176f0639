"""The distillation loss: (1 - kd_ratio) * cross-entropy + kd_ratio * T^2 * KL over the label tokens,
in chunks of tokens so that the float32 copies of the student's and the teacher's logits exist for one
chunk at a time, forward and backward (each chunk is recomputed in the backward instead of saved)."""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.config.schema import DistillConfig
from trainer.loss import IGNORE_INDEX, TokenLoss


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-token KL divergence between the two next-token distributions, in float32.
    forward: KL(teacher || student), which spreads the student over everything the teacher finds likely;
    reverse: KL(student || teacher), which lets the student settle on the teacher's main modes."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    if direction == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


class DistillLoss(TokenLoss):
    """Called like TokenLoss, with the microbatch's inputs as well (the teacher reads them). The running
    sums of its two terms are kept apart for the metrics."""

    def __init__(self, cfg: DistillConfig, teacher: torch.nn.Module):
        super().__init__()
        self.cfg, self.teacher = cfg, teacher
        self.ce_summed = self.kl_summed = torch.zeros(())

    def start(self, scale: float, device: torch.device) -> None:
        super().start(scale, device)
        self.ce_summed = torch.zeros((), device=device)
        self.kl_summed = torch.zeros((), device=device)

    def plain(self) -> TokenLoss:
        """Validation measures the student's own cross-entropy, not the training objective."""
        return TokenLoss()

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None,
                 documents: torch.Tensor | None = None) -> torch.Tensor:
        if inputs is None:
            raise ValueError("distillation runs the teacher on the microbatch's inputs, and got none")
        with torch.no_grad():  # the teacher sees the student's windows with the student's document masks
            teacher_logits = self.teacher(inputs) if documents is None else self.teacher(inputs, documents=documents)
        kept = (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)  # prompt tokens cost nothing
        student, teacher = logits.flatten(0, 1)[kept], teacher_logits.flatten(0, 1)[kept]
        targets = labels.flatten()[kept]
        ce_sum = kl_sum = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, kept.numel(), self.cfg.chunk_tokens):
            piece = slice(start, start + self.cfg.chunk_tokens)
            ce, kl = checkpoint(self._chunk, student[piece], teacher[piece], targets[piece], use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        self.ce_summed += ce_sum.detach()
        self.kl_summed += kl_sum.detach()
        r = self.cfg.kd_ratio
        return ((1 - r) * ce_sum + r * kl_sum) * self.scale

    def _chunk(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor):
        """(summed cross-entropy, summed T^2-scaled KL) of one chunk of label tokens. The T^2 keeps the
        KL's gradients the size of the cross-entropy's whatever the temperature (Hinton et al., 2015)."""
        t = self.cfg.temperature
        ce = F.cross_entropy(student.float(), targets, reduction="sum")
        kl = kd_divergence(student.float() / t, teacher.float() / t, self.cfg.loss).sum() * t * t
        return ce, kl

    def parts(self) -> dict[str, torch.Tensor]:
        """The step's summed terms (unscaled, like `summed`), logged beside the loss."""
        return {"ce": self.ce_summed, "kl": self.kl_summed}
