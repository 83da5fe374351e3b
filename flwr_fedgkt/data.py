"""Data sets and partitions for FedGKT (and the FedAvg baseline).

Every sample carries a stable integer *sample id* (its index in the full data set),
so that knowledge-distillation targets can be looked up by id rather than by batch
position.

Data sets
---------
``digits``
    scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes),
    upsampled to 32x32x3. Ships inside an installed package: no network needed.
``synthetic``
    Seeded class-template images with noise, for tests.

Partitions come from flwr-datasets' partitioners applied to an in-memory
``datasets.Dataset`` of sample ids and labels; each partition is then split into
train/test (80/20, seeded).

This module imports no Flower code (flwr-datasets is a data library, not the
Flower runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SampleSet",
    "Partition",
    "DATASETS",
    "PARTITIONERS",
    "load_dataset",
    "load_partition",
    "partition_indices",
]

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SampleSet:
    """Images with their labels and stable sample ids (all on the CPU)."""

    images: Tensor  # N x 3 x 32 x 32, float32, normalised
    labels: Tensor  # N, int64
    ids: Tensor  # N, int64, unique

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
        return SampleSet(self.images[index], self.labels[index], self.ids[index])


@dataclass(frozen=True)
class Partition:
    """One node's data: its train and test split, and the data set's class count."""

    train: SampleSet
    test: SampleSet
    num_classes: int


def _normalise(images: Tensor) -> Tensor:
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std


def _digits(seed: int) -> tuple[SampleSet, int]:
    del seed  # a fixed, real data set
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    images = _normalise(images.repeat(1, 3, 1, 1)).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    ids = torch.arange(len(labels), dtype=torch.long)
    return SampleSet(images, labels, ids), 10


def _synthetic(seed: int, num_samples: int = 600, num_classes: int = 10) -> tuple[SampleSet, int]:
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 8, 8, generator=gen)
    templates = F.interpolate(templates, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.arange(num_samples, dtype=torch.long) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    noise = 0.8 * torch.randn(num_samples, 3, 32, 32, generator=gen)
    images = _normalise(templates[labels] + noise).contiguous()
    return SampleSet(images, labels, torch.arange(num_samples, dtype=torch.long)), num_classes


DATASETS: dict[str, Callable[[int], tuple[SampleSet, int]]] = {
    "digits": _digits,
    "synthetic": _synthetic,
}

PARTITIONERS = ("iid", "dirichlet")


@lru_cache(maxsize=4)
def load_dataset(name: str, seed: int = 0) -> tuple[SampleSet, int]:
    """The whole data set ``name`` and its number of classes."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
        ) from None
    return loader(seed)


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
) -> list[np.ndarray]:
    """Sample indices of every partition, from flwr-datasets' partitioners.

    The partitioner runs on an in-memory ``datasets.Dataset`` with an ``index`` and
    a ``label`` column; the returned arrays hold values of ``index``.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if num_partitions > len(labels):
        raise ValueError(
            f"num_partitions ({num_partitions}) exceeds the number of samples ({len(labels)})"
        )
    part: Partitioner
    if partitioner == "iid":
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        if dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet-alpha must be positive, got {dirichlet_alpha}")
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=dirichlet_alpha,
            min_partition_size=0,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    else:
        raise ValueError(
            f"unknown partitioner {partitioner!r}; expected one of {', '.join(PARTITIONERS)}"
        )
    part.dataset = Dataset.from_dict(
        {"index": np.arange(len(labels), dtype=np.int64), "label": np.asarray(labels)}
    )
    return [
        np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)
    ]


@lru_cache(maxsize=8)
def _all_partitions(
    dataset: str, num_partitions: int, partitioner: str, dirichlet_alpha: float, seed: int
) -> tuple[np.ndarray, ...]:
    full, _ = load_dataset(dataset, seed)
    return tuple(
        partition_indices(full.labels.numpy(), num_partitions, partitioner, dirichlet_alpha, seed)
    )


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
) -> Partition:
    """Node ``partition_id``'s data, split 80/20 into train and test (seeded)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is out of range for {num_partitions} partitions"
        )
    full, num_classes = load_dataset(dataset, seed)
    index = _all_partitions(dataset, num_partitions, partitioner, float(dirichlet_alpha), seed)[
        partition_id
    ]
    rng = np.random.default_rng([seed, partition_id])
    index = rng.permutation(index)
    num_test = int(round(TEST_FRACTION * len(index)))
    if len(index) > 1:
        num_test = min(max(num_test, 1), len(index) - 1)
    return Partition(
        train=full.subset(index[num_test:]),
        test=full.subset(index[:num_test]),
        num_classes=num_classes,
    )
