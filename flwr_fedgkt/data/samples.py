"""Samples with stable ids, one node's partition, and a data set's summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Augmentation", "SampleSet", "Partition", "DatasetInfo"]

Augmentation = Callable[[Tensor, torch.Generator | None], Tensor]
"""Per-sample augmentation of a batch: ``augment(images, generator) -> images``, the
same batch size and order; random draws come from ``generator`` when given."""


@dataclass(frozen=True)
class SampleSet:
    """Images with their labels and stable sample ids (all on the CPU).

    ``augmentation`` is how training augments batches of these images (``None``:
    not at all); a training split carries it, a test split does not. Images are
    stored un-augmented; training applies it per batch, feature extraction never.
    """

    images: Tensor  # N x 3 x 32 x 32, float32, normalised
    labels: Tensor  # N, int64
    ids: Tensor  # N, int64, unique
    augmentation: Augmentation | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise ValueError(
                f"images ({n}), labels {tuple(self.labels.shape)} and ids "
                f"{tuple(self.ids.shape)} disagree in length"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: Tensor | np.ndarray) -> SampleSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return SampleSet(self.images[index], self.labels[index], self.ids[index], self.augmentation)


@dataclass(frozen=True)
class Partition:
    """One node's data: its train and test split, and the data set's class count."""

    train: SampleSet
    test: SampleSet
    num_classes: int


@dataclass(frozen=True)
class DatasetInfo:
    """What the server needs to know about a data set before a run starts."""

    name: str
    num_classes: int
    num_train: int
    num_test: int
    source: str

    def summary(self) -> str:
        """One line for a log."""
        if self.num_test == 0:
            sizes = f"{self.num_train} images, each node's partition split 80/20"
        else:
            sizes = f"{self.num_train} training / {self.num_test} test images"
        return f"{self.name}: {self.num_classes} classes, {sizes} ({self.source})"
