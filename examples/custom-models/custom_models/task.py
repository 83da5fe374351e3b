"""custom_models: the model pair and the data.

A FedGKT model pair of your own. The edge model is an MLP on the 64 pixel values of
an 8x8 digit: an extractor maps them to a 32-value feature vector, and a linear
head maps that vector to logits. Its ``forward`` returns both ``(logits,
features)``. The server model is a wider MLP that maps the 32 features to logits.
Any pair fits this shape, provided the server model takes a batch of the edge
model's features.
"""

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

NUM_CLASSES = 10
NUM_PIXELS = 64
FEATURE_DIM = 32
FEATURE_SHAPE = (FEATURE_DIM,)
"""One sample's features: a vector of 32 values."""


class EdgeMLP(nn.Module):
    """The edge model: 64 pixels -> 32 features -> 10 logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.extractor = nn.Sequential(
            nn.Linear(NUM_PIXELS, hidden),
            nn.ReLU(),
            nn.Linear(hidden, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(x)  # (batch, 32)
        return self.head(features), features


class ServerMLP(nn.Module):
    """The server model: 32 features -> 10 logits, through two hidden layers."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(FEATURE_DIM, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def new_edge_model(seed: int) -> EdgeMLP:
    """An EdgeMLP initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return EdgeMLP()


def new_server_model(seed: int) -> ServerMLP:
    """A ServerMLP initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ServerMLP()


partitioner = None  # Cache the partitioner (and its data set) in this process


def digits_dataset() -> Dataset:
    """The digits as a ``datasets.Dataset``: ``pixels`` (64 values in [0, 1]),
    ``label`` and ``id`` (the image's index in the whole data set)."""
    digits = load_digits()
    return Dataset.from_dict(
        {
            "pixels": (digits.data / 16.0).astype(np.float32),
            "label": digits.target,
            "id": np.arange(len(digits.target)),
        }
    )


def load_data(partition_id: int, num_partitions: int) -> tuple[TensorDataset, TensorDataset]:
    """This node's IID partition of the digits, split 80/20 into train and test;
    items are ``(pixels, label, sample_id)``."""
    global partitioner
    if partitioner is None or partitioner.num_partitions != num_partitions:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = digits_dataset()
    splits = partitioner.load_partition(partition_id).train_test_split(test_size=0.2, seed=42)

    def as_tensors(split: Dataset) -> TensorDataset:
        columns = split.with_format("torch")[:]
        return TensorDataset(columns["pixels"], columns["label"], columns["id"])

    return as_tensors(splits["train"]), as_tensors(splits["test"])
