"""The epoch loop that the edge, the server and the FedAvg baseline share.

A trainer supplies its batches and one step; :func:`train_epochs` runs the step
over every batch of every epoch and adds up, weighted by samples, the step's
loss and its CE and KD parts and the correct predictions. A step may decline a
batch (return None: the server skips a step whose loss or gradients are not
finite), which then counts for nothing.

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from .distill import DistillLoss

__all__ = [
    "EpochTotals",
    "LRScheduleFactory",
    "OptimizerFactory",
    "StepOutcome",
    "make_optimizer",
    "optimizer_step",
    "set_lr",
    "train_epochs",
]

B = TypeVar("B")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
"""Builds an optimizer from the parameters to train."""

LRScheduleFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
"""Builds a learning-rate schedule (stepped once per epoch) from the optimizer."""

StepOutcome = tuple[DistillLoss, Tensor, Tensor]
"""What a step reports: its loss parts, the batch's logits and its labels."""


@dataclass
class EpochTotals:
    """Sample-weighted sums over one epoch's steps."""

    loss: float = 0.0
    ce: float = 0.0
    kd: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, parts: DistillLoss, logits: Tensor, labels: Tensor) -> None:
        n = len(labels)
        self.loss += float(parts.loss.detach()) * n
        self.ce += float(parts.ce.detach()) * n
        self.kd += float(parts.kd.detach()) * n
        self.correct += int((logits.detach().argmax(1) == labels).sum())
        self.seen += n

    def means(self) -> dict[str, float]:
        """``loss``, ``ce``, ``kd`` (``loss = ce + alpha * kd``) and ``accuracy``,
        each a mean over the epoch's samples (0 for an epoch without any)."""
        seen = max(self.seen, 1)
        return {
            "loss": self.loss / seen,
            "ce": self.ce / seen,
            "kd": self.kd / seen,
            "accuracy": self.correct / seen,
        }


def make_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    factory: OptimizerFactory | None = None,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """``factory(params)`` with its learning rate set to ``lr`` (its weight decay is
    the factory's), or Adam with ``lr`` and ``weight_decay`` when no factory."""
    if factory is None:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    optimizer = factory(params)
    set_lr(optimizer, lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: Tensor, scaler: torch.amp.GradScaler | None = None
) -> None:
    """Clear the gradients, backpropagate ``loss`` and take one step; through
    ``scaler`` when given (float16: the loss scaled, a step whose gradients
    overflow skipped and the scale lowered)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_epochs(
    epochs: int,
    batches: Callable[[], Iterable[B]],
    step: Callable[[B], StepOutcome | None],
    on_epoch_end: Callable[[EpochTotals], None] | None = None,
) -> EpochTotals:
    """Run ``step`` over ``batches()`` for ``epochs`` epochs (none when ``epochs``
    is not positive); ``on_epoch_end`` sees each epoch's totals. Returns the last
    epoch's totals."""
    totals = EpochTotals()
    for _ in range(max(epochs, 0)):
        totals = EpochTotals()
        for batch in batches():
            outcome = step(batch)
            if outcome is not None:
                totals.add(*outcome)
        if on_epoch_end is not None:
            on_epoch_end(totals)
    return totals
