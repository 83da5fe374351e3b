"""What a FedAvg node does with the full model, without Flower: train it locally for
some epochs, and score it on a test split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.distill import ce_kd_loss
from flwr_fedgkt.edge_data import training_batches
from flwr_fedgkt.training import StepOutcome, optimizer_step, train_epochs

__all__ = ["make_optimizer", "train_model", "evaluate_model"]


def make_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.Optimizer:
    """``sgd`` (with momentum) or ``adam`` over all of ``model``'s parameters."""
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd or adam")


def train_model(
    model: nn.Module,
    data: SampleSet,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train ``model`` with cross-entropy for ``epochs`` over ``data``.

    Batches are shuffled (and augmented, when ``data`` carries an augmentation)
    exactly as FedGKT's edge training does, drawing from ``generator``.

    Returns
    -------
    dict[str, float]
        ``train_loss`` and ``train_accuracy`` of the last epoch.
    """
    model.train()

    def step(batch: tuple[Tensor, Tensor, Tensor]) -> StepOutcome:
        images, labels, _ = batch
        images = images.to(device, memory_format=torch.channels_last)
        labels = labels.to(device)
        logits = model(images)
        parts = ce_kd_loss(logits, labels, None)  # cross-entropy only
        optimizer_step(optimizer, parts.loss)
        return parts, logits, labels

    totals = train_epochs(epochs, lambda: training_batches(data, batch_size, generator), step)
    means = totals.means()
    return {"train_loss": means["loss"], "train_accuracy": means["accuracy"]}


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: SampleSet, batch_size: int = 32, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Cross-entropy ``loss`` and ``accuracy`` of ``model`` (eval mode) on ``data``
    (in batches of 32, as FedGKT scores: larger ones ran slower on a CPU)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        images = data.images[start : start + batch_size].to(
            device, memory_format=torch.channels_last
        )
        labels = data.labels[start : start + batch_size].to(device)
        logits = model(images)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
    n = len(data)
    return {"loss": loss_sum / n if n else 0.0, "accuracy": correct / n if n else 0.0}
