"""The app's own model pair and data.

The edge model is a one-layer MLP on the 64 pixels of an 8x8 digit: ``Linear(64,
32)`` and ReLU give 32 features, ``Linear(32, 10)`` the logits; its ``forward``
returns ``(logits, features)``. The server model is an MLP on those 32 features.
The data are scikit-learn's digits as a ``datasets.Dataset`` of dict items
``{"img": 64 floats in [0, 1], "label": int}``, partitioned with flwr-datasets'
``IidPartitioner``.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits
from torch import nn

NUM_CLASSES = 10
NUM_PIXELS = 64
FEATURE_DIM = 32
FEATURE_SHAPE = (FEATURE_DIM,)


class EdgeMLP(nn.Module):
    """The edge model: 64 pixels -> 32 features -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Linear(NUM_PIXELS, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(x.flatten(1))
        return self.head(features), features


class ServerMLP(nn.Module):
    """The server model: 32 features -> 128 hidden -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(FEATURE_DIM, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def profile(model: nn.Module) -> dict[str, object]:
    """A model's class name and parameter count, as results.json reports them."""
    return {
        "name": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
    }


_partitioner: IidPartitioner | None = None  # cached in this process


def load_data(partition_id: int, num_partitions: int, seed: int) -> tuple[Dataset, Dataset]:
    """This node's IID partition of the digits, split 80/20 into train and test,
    as ``datasets.Dataset``s of ``{"img": [64 floats], "label": int}`` items."""
    global _partitioner
    if _partitioner is None or _partitioner.num_partitions != num_partitions:
        digits = load_digits()
        _partitioner = IidPartitioner(num_partitions=num_partitions)
        _partitioner.dataset = Dataset.from_dict(
            {"img": (digits.data / 16.0).astype(np.float32), "label": digits.target}
        )
    splits = _partitioner.load_partition(partition_id).train_test_split(test_size=0.2, seed=seed)
    return splits["train"], splits["test"]
