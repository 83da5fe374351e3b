"""Partitions from flwr-datasets' partitioners, and the sample-id numbering that
precedes them.

``build_partitioner`` makes the partitioner of a name (``iid``, ``dirichlet``,
``pathological``; ``dirichlet`` and ``pathological`` seeded, ``iid`` contiguous
shards in the order it is given). ``partition_indices`` runs one over an in-memory label
array. ``with_sample_ids`` numbers the splits of an image data set and shuffles
them (seeded), for the Hub's copy and a local copy alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import DatasetDict
    from flwr_datasets.partitioner import Partitioner

__all__ = [
    "PARTITIONERS",
    "SAMPLE_ID",
    "build_partitioner",
    "index_partitioner",
    "load_partition_column",
    "partition_indices",
    "split_partitioners",
    "with_sample_ids",
]

PARTITIONERS = ("iid", "dirichlet", "pathological")
SAMPLE_ID = "sample_id"


def build_partitioner(
    partitioner: str,
    num_partitions: int,
    label_column: str = "label",
    dirichlet_alpha: float = 0.5,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 42,
) -> Partitioner:
    """A fresh flwr-datasets partitioner (no data set assigned yet).

    Parameters
    ----------
    partitioner : str
        ``iid`` (``IidPartitioner``: equal contiguous shards in the order the data
        come: the image data sets shuffled with the seed first, ``digits`` and
        ``synthetic`` in sample-id order),
        ``dirichlet`` (``DirichletPartitioner``: label shares per node drawn from
        Dir(``dirichlet_alpha``), self-balancing) or ``pathological``
        (``PathologicalPartitioner``: ``classes_per_partition`` classes per node,
        the first one assigned deterministically so that every class is used when
        there are at least as many nodes as classes).
    num_partitions : int
        Number of partitions (nodes).
    label_column : str (default: "label")
        Column the non-IID partitioners split by.
    dirichlet_alpha : float (default: 0.5)
        Concentration; smaller is more skewed.
    classes_per_partition : int (default: 2)
        Classes per node of the pathological partitioner.
    min_partition_size : int (default: 10)
        Smallest partition the Dirichlet partitioner accepts (it redraws otherwise).
    seed : int (default: 42)
        Seeds the non-IID partitioners.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    if partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if partitioner == "dirichlet":
        if dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet-alpha must be positive, got {dirichlet_alpha}")
        if min_partition_size < 0:
            raise ValueError(f"min-partition-size must not be negative, got {min_partition_size}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=dirichlet_alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    if partitioner == "pathological":
        if classes_per_partition < 1:
            raise ValueError(
                f"classes-per-partition must be at least 1, got {classes_per_partition}"
            )
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    raise ValueError(
        f"unknown partitioner {partitioner!r}; expected one of {', '.join(PARTITIONERS)}"
    )


def load_partition_column(part: Partitioner, partition_id: int, column: str) -> np.ndarray:
    """``column`` of partition ``partition_id``, as int64; a partitioner's failure is a
    ``ValueError`` that says so."""
    try:
        return np.asarray(part.load_partition(partition_id)[column], dtype=np.int64)
    except ValueError as err:  # e.g. no Dirichlet draw met min_partition_size
        raise ValueError(f"partitioning failed: {err}") from None


def split_partitioners(
    partitioner: str,
    num_partitions: int,
    label_column: str,
    dirichlet_alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> dict[str, Partitioner]:
    """The partitioners of an image data set's splits (the Hub's copy and a local
    copy alike): the training split by ``partitioner``, the test split IID."""
    return {
        "train": build_partitioner(
            partitioner,
            num_partitions,
            label_column=label_column,
            dirichlet_alpha=dirichlet_alpha,
            classes_per_partition=classes_per_partition,
            min_partition_size=min_partition_size,
            seed=seed,
        ),
        "test": build_partitioner("iid", num_partitions),
    }


def index_partitioner(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    seed: int,
    classes_per_partition: int,
    min_partition_size: int,
) -> Partitioner:
    """A partitioner assigned to an in-memory ``(index, label)`` table."""
    from datasets import Dataset

    if num_partitions > len(labels):
        raise ValueError(
            f"num_partitions ({num_partitions}) exceeds the number of samples ({len(labels)})"
        )
    part = build_partitioner(
        partitioner,
        num_partitions,
        dirichlet_alpha=dirichlet_alpha,
        classes_per_partition=classes_per_partition,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    part.dataset = Dataset.from_dict(
        {"index": np.arange(len(labels), dtype=np.int64), "label": np.asarray(labels)}
    )
    return part


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
    *,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Sample indices of every partition, from flwr-datasets' partitioners.

    The partitioner runs on an in-memory ``datasets.Dataset`` with an ``index`` and
    a ``label`` column; the returned arrays hold values of ``index``. See
    :func:`build_partitioner` for the parameters.
    """
    part = index_partitioner(
        labels,
        num_partitions,
        partitioner,
        dirichlet_alpha,
        seed,
        classes_per_partition,
        min_partition_size,
    )
    return [load_partition_column(part, i, "index") for i in range(num_partitions)]


def with_sample_ids(seed: int) -> Callable[[DatasetDict], DatasetDict]:
    """A ``FederatedDataset`` preprocessor: number the samples, then shuffle.

    Training samples get ids ``0 .. n_train - 1`` (their index in the training
    split), test samples ``n_train .. n_train + n_test - 1``; each split is then
    shuffled with ``seed`` so that the IID partitioner's contiguous shards are
    random samples.
    """

    def preprocess(splits: DatasetDict) -> DatasetDict:
        from datasets import DatasetDict

        offset = {"train": 0, "test": len(splits["train"])}
        return DatasetDict(
            {
                split: splits[split]
                .add_column(
                    SAMPLE_ID, np.arange(len(splits[split]), dtype=np.int64) + offset[split]
                )
                .shuffle(seed=seed)
                for split in ("train", "test")
            }
        )

    return preprocess
