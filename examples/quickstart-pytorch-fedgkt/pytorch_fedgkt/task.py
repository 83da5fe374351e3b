"""pytorch_fedgkt: the models and the data.

The quickstart's single ``Net`` is split in two. ``EdgeNet`` is the small CNN that
every node trains; its ``forward`` returns the logits *and* the features the node
uploads. ``ServerNet`` is the larger CNN that the server trains on those features.
The data are scikit-learn's handwritten digits (1,797 8x8 grey images, bundled with
the package, so nothing is downloaded), partitioned IID across the nodes.
"""

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
FEATURE_SHAPE = (16, 4, 4)
"""One image's features: the output of EdgeNet's extractor on an 8x8 image."""


class EdgeNet(nn.Module):
    """The edge CNN: one convolution block (the extractor) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(16 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pool(F.relu(self.conv(x)))  # (batch, 16, 4, 4)
        logits = self.fc(torch.flatten(features, 1))
        return logits, features


class ServerNet(nn.Module):
    """The server CNN: maps a batch of EdgeNet features to logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 2 * 2, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))  # (batch, 64, 2, 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` initialised from ``seed``, so that runs repeat (the global RNG
    is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


partitioner = None  # Cache the partitioner (and its data set) in this process


def digits_dataset() -> Dataset:
    """The digits as a ``datasets.Dataset``: ``image`` (8x8, scaled to [0, 1]),
    ``label`` and ``id`` (the image's index in the whole data set)."""
    digits = load_digits()
    return Dataset.from_dict(
        {
            "image": (digits.images / 16.0).astype(np.float32),
            "label": digits.target,
            "id": np.arange(len(digits.target)),
        }
    )


def load_data(partition_id: int, num_partitions: int) -> tuple[TensorDataset, TensorDataset]:
    """This node's partition of the digits, split 80/20 into train and test.

    Items are ``(image, label, sample_id)``: ``image`` is a 1x8x8 tensor and the
    sample id is the image's index in the whole data set, the same every round.
    """
    global partitioner
    if partitioner is None or partitioner.num_partitions != num_partitions:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = digits_dataset()
    partition = partitioner.load_partition(partition_id)
    # Divide data on each node: 80% train, 20% test
    splits = partition.train_test_split(test_size=0.2, seed=42)

    def as_tensors(split: Dataset) -> TensorDataset:
        columns = split.with_format("torch")[:]
        return TensorDataset(columns["image"].unsqueeze(1), columns["label"], columns["id"])

    return as_tensors(splits["train"]), as_tensors(splits["test"])
