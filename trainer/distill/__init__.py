"""Knowledge distillation: the same trainer with another loss (DESIGN rule 9). A frozen teacher, sharded
like the student, gives its next-token distributions; the student learns from them and from the labels."""

from trainer.distill.loss import DistillLoss, kd_divergence
from trainer.distill.teacher import build_teacher, check_teacher

__all__ = ["DistillLoss", "build_teacher", "check_teacher", "kd_divergence"]
