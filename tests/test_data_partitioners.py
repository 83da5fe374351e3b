"""flwr-datasets partitioners as the package builds them, on small in-memory data."""

import numpy as np
import pytest
from datasets import Dataset

from flwr_fedgkt.data import build_partitioner, partition_indices

NUM_CLASSES = 10


def _labels(per_class: int = 100, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _partitions(name: str, num_partitions: int, seed: int = 42, **options) -> list[np.ndarray]:
    """Label arrays of every partition, from a partitioner assigned to a Dataset."""
    part = build_partitioner(name, num_partitions, seed=seed, **options)
    part.dataset = Dataset.from_dict({"label": _labels()})
    return [np.asarray(part.load_partition(i)["label"]) for i in range(num_partitions)]


def _skew(partitions: list[np.ndarray]) -> float:
    """Mean total-variation distance between each partition's label distribution
    and the uniform one (0: IID; close to 1: one class per partition)."""
    distances = []
    for labels in partitions:
        shares = np.bincount(labels, minlength=NUM_CLASSES) / max(len(labels), 1)
        distances.append(0.5 * np.abs(shares - 1.0 / NUM_CLASSES).sum())
    return float(np.mean(distances))


def test_iid_partitions_have_equal_sizes_and_cover_every_sample() -> None:
    # Prepare
    labels = _labels()
    # Execute
    parts = partition_indices(labels, 4, "iid")
    # Assert
    assert [len(p) for p in parts] == [250, 250, 250, 250]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert _skew([labels[p] for p in parts]) < 0.15


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    # Prepare
    alphas = (100.0, 1.0, 0.1)
    # Execute
    skews = [
        np.mean(
            [
                _skew(_partitions("dirichlet", 5, seed=s, dirichlet_alpha=a, min_partition_size=0))
                for s in (1, 2, 3)
            ]
        )
        for a in alphas
    ]
    # Assert
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.15 and skews[2] > 0.5, skews


def test_dirichlet_keeps_every_sample_once() -> None:
    # Prepare
    labels = _labels()
    # Execute
    parts = partition_indices(labels, 5, "dirichlet", dirichlet_alpha=0.3, seed=7)
    # Assert
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 10  # the default min-partition-size


def test_pathological_partitions_hold_the_requested_number_of_classes() -> None:
    # Prepare
    num_partitions = 5
    # Execute
    parts = _partitions("pathological", num_partitions, classes_per_partition=2)
    # Assert
    for i, labels in enumerate(parts):
        classes = set(np.unique(labels).tolist())
        assert len(classes) == 2, (i, classes)
        assert i in classes  # the first class is assigned deterministically


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("dirichlet", {"dirichlet_alpha": 0.5, "min_partition_size": 0}),
        ("pathological", {"classes_per_partition": 3}),
    ],
)
def test_partitions_are_reproducible_with_the_same_seed(name: str, options: dict) -> None:
    # Prepare
    labels = _labels()
    # Execute
    first = partition_indices(labels, 4, name, seed=3, **options)
    again = partition_indices(labels, 4, name, seed=3, **options)
    other = partition_indices(labels, 4, name, seed=4, **options)
    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_bad_partitioner_settings_are_named() -> None:
    with pytest.raises(ValueError, match="unknown partitioner 'shards'"):
        build_partitioner("shards", 2)
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        build_partitioner("dirichlet", 2, dirichlet_alpha=0.0)
    with pytest.raises(ValueError, match="classes-per-partition"):
        build_partitioner("pathological", 2, classes_per_partition=0)
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        partition_indices(np.zeros(3, dtype=np.int64), 4)
