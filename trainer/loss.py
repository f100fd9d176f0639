"""The training loss: summed next-token cross-entropy, scaled so that a step's gradient is that of the
mean over every label token of the global batch (whatever the split into ranks and microbatches)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class TokenLoss:
    """Called once per microbatch (by the trainer, or by a pipeline schedule on the last stage)."""

    def __init__(self):
        self.scale = 1.0
        self.summed = torch.zeros(())

    @staticmethod
    def count(labels: torch.Tensor) -> torch.Tensor:
        return (labels != IGNORE_INDEX).sum()

    def start(self, scale: float, device: torch.device) -> None:
        """Begins an optimizer step: `scale` turns a summed loss into this step's share of the mean."""
        self.scale = scale
        self.summed = torch.zeros((), device=device)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled loss of one microbatch, to call backward on (`inputs` serve losses that read them)."""
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
