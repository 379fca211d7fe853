"""Distillation losses as small nn.Modules (torchtune's kd_losses style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KDLoss(nn.Module):
    """alpha * CE(hard labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T).

    Args:
        alpha: weight of the hard-label cross-entropy, in [0, 1].
        temperature: softening temperature T > 0 applied to both logit sets.

    Shapes: student_logits (B, C), teacher_logits (B, C) or None, labels (B,) int64.
    With teacher_logits None (or alpha == 1) the loss is plain cross-entropy.

    Raises:
        ValueError: alpha outside [0, 1], T <= 0, or mismatched logit shapes.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor,
                teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        ce = F.cross_entropy(student_logits, labels)
        if teacher_logits is None or self.alpha == 1.0:
            return ce
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(student_logits.shape)}")
        t = self.temperature
        # KL(p_teacher || p_student) per example, summed over classes, averaged over the batch.
        kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                      reduction="batchmean", log_target=True)
        return self.alpha * ce + (1.0 - self.alpha) * (t * t) * kl
