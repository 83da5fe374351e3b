"""The task of both quickstart apps: Net, the data, train and test.

Flower's quickstart-pytorch ``task.py`` (Net, CIFAR-10 partitioned with
``IidPartitioner`` and split 80/20 on each node, ``train`` with SGD, ``test``),
shared by the FedGKT app (``examples/quickstart-pytorch-fedgkt``) and its FedAvg
twin (``examples/quickstart-pytorch-fedavg``): this file is in both, byte for
byte (a test checks it), so that both apps train the same model on the same data.

Added to Flower's version:

- an offline stand-in for CIFAR-10, the default (run config ``dataset =
  "digits"``): scikit-learn's handwritten digits (bundled, nothing is
  downloaded) upsampled to 32x32 and repeated to 3 channels, a ``datasets.Dataset``
  with CIFAR-10's columns ``img`` (PIL images) and ``label``. A fixed 20 % of it
  is the server's centralized test set, the rest is partitioned across the nodes.
  ``dataset = "cifar10"`` loads ``uoft-cs/cifar10`` as Flower's quickstart does;
- ``load_partition``: a node's 80/20 split as data sets (``load_data`` wraps it
  in data loaders), which FedGKT's client takes directly;
- ``seeded`` (a model built from a seed) and ``RunResults`` (``results.json``).
"""

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from datasets import Image as ImageFeature
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision.transforms import Compose, Normalize, ToTensor

DIGITS = "digits"
CIFAR10 = "cifar10"


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


ModelT = TypeVar("ModelT")


def seeded(factory: Callable[[], ModelT], seed: int) -> ModelT:
    """``factory()`` with torch's RNG seeded from ``seed`` (and left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


fds = None  # Cache FederatedDataset
digits_partitioner = None  # Cache the digits' partitioner

pytorch_transforms = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def apply_transforms(batch):
    """Apply transforms to the partition from FederatedDataset."""
    batch["img"] = [pytorch_transforms(img) for img in batch["img"]]
    return batch


@functools.cache
def digits_splits() -> DatasetDict:
    """The offline stand-in for CIFAR-10: scikit-learn's 1,797 digits as 32x32 RGB
    PIL images (``img``) with their ``label``; ``train`` (80 %) is partitioned
    across the nodes, ``test`` (20 %, always the same) is the server's."""
    digits = load_digits()
    images = [
        Image.fromarray((image * 255 / 16).astype(np.uint8))
        .resize((32, 32), Image.Resampling.BILINEAR)
        .convert("RGB")
        for image in digits.images
    ]
    features = Features({"img": ImageFeature(), "label": ClassLabel(num_classes=10)})
    dataset = Dataset.from_dict({"img": images, "label": digits.target.tolist()}, features)
    return dataset.train_test_split(test_size=0.2, seed=42)


def load_partition(partition_id: int, num_partitions: int, dataset: str = DIGITS) -> DatasetDict:
    """This node's partition of ``dataset``, split 80/20 into ``train`` and ``test``
    (items ``{"img": PIL image, "label": int}``, no transform applied)."""
    global fds, digits_partitioner
    if dataset == CIFAR10:
        # Only initialize `FederatedDataset` once
        if fds is None:
            partitioner = IidPartitioner(num_partitions=num_partitions)
            fds = FederatedDataset(
                dataset="uoft-cs/cifar10",
                partitioners={"train": partitioner},
            )
        partition = fds.load_partition(partition_id)
    elif dataset == DIGITS:
        if digits_partitioner is None or digits_partitioner.num_partitions != num_partitions:
            digits_partitioner = IidPartitioner(num_partitions=num_partitions)
            digits_partitioner.dataset = digits_splits()["train"]
        partition = digits_partitioner.load_partition(partition_id)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use {DIGITS!r} or {CIFAR10!r}")
    # Divide data on each node: 80% train, 20% test
    return partition.train_test_split(test_size=0.2, seed=42)


def load_data(partition_id: int, num_partitions: int, batch_size: int, dataset: str = DIGITS):
    """Load partition CIFAR10 data (or its offline stand-in)."""
    partition_train_test = load_partition(partition_id, num_partitions, dataset)
    # Construct dataloaders
    partition_train_test = partition_train_test.with_transform(apply_transforms)
    trainloader = DataLoader(partition_train_test["train"], batch_size=batch_size, shuffle=True)
    testloader = DataLoader(partition_train_test["test"], batch_size=batch_size)
    return trainloader, testloader


def load_centralized_dataset(dataset: str = DIGITS):
    """Load test set and return dataloader."""
    # Load entire test set
    if dataset == CIFAR10:
        test_dataset = load_dataset("uoft-cs/cifar10", split="test")
    elif dataset == DIGITS:
        test_dataset = digits_splits()["test"]
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use {DIGITS!r} or {CIFAR10!r}")
    test_dataset = test_dataset.with_transform(apply_transforms)
    return DataLoader(test_dataset, batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)  # move model to GPU if available
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg_trainloss = running_loss / (epochs * len(trainloader))
    return avg_trainloss


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy


class RunResults:
    """A run's ``results.json`` in its ``output-dir``, rewritten after every round
    (a crash keeps the rounds done).

    It holds the run config, ``initial`` (the global evaluation before round 1)
    and one record per round: ``round``, ``centralized_accuracy`` and
    ``centralized_loss`` (the global evaluation on the server's test set; None
    without one), ``seconds`` (the round's wall-clock seconds: its training and
    client evaluation, not the global evaluation), ``elapsed_seconds`` (since the
    start of the run, global evaluations included) and what ``extra(round)`` adds
    (e.g. a strategy's own round record).
    """

    def __init__(
        self,
        run_config: dict[str, Any],
        extra: Callable[[int], dict[str, Any]] | None = None,
    ) -> None:
        output_dir = str(run_config.get("output-dir", ""))
        output_dir = output_dir or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}"
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.results: dict[str, Any] = {"run_config": dict(run_config), "initial": None}
        self.results["rounds"] = []
        self.start = self.round_start = time.perf_counter()

    def track(self, evaluate_fn=None):
        """The ``evaluate_fn`` to give ``strategy.start``: it calls ``evaluate_fn``
        (when given; Flower calls it before round 1 and after every round) and
        records the round."""

        def evaluate(server_round, arrays):
            now = time.perf_counter()
            metrics = None if evaluate_fn is None else evaluate_fn(server_round, arrays)
            record: dict[str, Any] = {
                "round": server_round,
                "centralized_accuracy": None if metrics is None else metrics["accuracy"],
                "centralized_loss": None if metrics is None else metrics["loss"],
                "seconds": round(now - self.round_start, 3),
                "elapsed_seconds": round(now - self.start, 3),
            }
            if server_round == 0:
                self.results["initial"] = record
            else:
                extra = {} if self.extra is None else self.extra(server_round)
                self.results["rounds"].append({**extra, **record})
            (self.output_dir / "results.json").write_text(json.dumps(self.results, indent=2))
            self.round_start = time.perf_counter()  # the next round starts now
            return metrics

        return evaluate

    def save_model(self, state_dict) -> Path:
        """``final_model.pt`` in the output folder."""
        path = self.output_dir / "final_model.pt"
        torch.save(state_dict, path)
        return path
