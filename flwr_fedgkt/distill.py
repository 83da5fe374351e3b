"""Knowledge-distillation losses used on both sides of FedGKT.

This module imports no Flower code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .privacy.mechanisms import corrected_cross_entropy

__all__ = ["kd_loss", "ce_kd_loss", "DistillLoss"]


class DistillLoss(NamedTuple):
    """A KD training loss and its parts: ``loss = ce + alpha * kd``."""

    loss: Tensor  # what to backpropagate
    ce: Tensor  # cross-entropy against the labels
    kd: Tensor  # the distillation term (T^2 * KL), before alpha; 0 without a teacher


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Soft-target distillation loss (Hinton et al.).

    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the
    batch (``batchmean``). The ``T^2`` factor keeps gradient magnitudes comparable
    across temperatures. The teacher is detached: gradients flow to the student only.

    Parameters
    ----------
    student_logits : Tensor
        ``B x C`` logits of the model being trained.
    teacher_logits : Tensor
        ``B x C`` logits of the teacher, same shape.
    temperature : float (default: 3.0)
        Softening temperature ``T``; must be positive.

    Returns
    -------
    Tensor
        A scalar; zero when the two sets of logits are equal.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def ce_kd_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None,
    temperature: float = 3.0,
    alpha: float = 1.0,
    label_keep: Tensor | None = None,
) -> DistillLoss:
    """``CE(logits, labels) + alpha * KD(logits, teacher_logits)``, with its parts.

    Without a teacher (``teacher_logits=None``, e.g. a client's first round) this is
    plain cross-entropy and ``kd`` is 0. With ``label_keep`` (per sample: the
    probability that randomized response kept its label) the cross-entropy is
    corrected for the flips
    (:func:`~flwr_fedgkt.privacy.mechanisms.corrected_cross_entropy`).
    """
    if label_keep is None:
        ce = F.cross_entropy(logits, labels)
    else:
        ce = corrected_cross_entropy(logits, labels, label_keep)
    if teacher_logits is None or alpha == 0:
        return DistillLoss(ce, ce.detach(), torch.zeros((), device=ce.device))
    kd = kd_loss(logits, teacher_logits, temperature)
    return DistillLoss(ce + alpha * kd, ce.detach(), kd.detach())
