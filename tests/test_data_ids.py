"""Sample ids are pinned: the same data set, seed, partitioner and number of
partitions give the same ids, labels and images, release after release.

The values below were recorded from the implementation before ``flwr_fedgkt.data``
became a package; KD targets and checkpoints are keyed by these ids.
"""

from pathlib import Path

import numpy as np
import pytest
from test_data_sources import (
    _decoded_ids,
    _raw_pixels,
    accept_fake_copy,
    write_cifar10,
    write_cifar100,
    write_cinic10,
)

from flwr_fedgkt.data import load_dataset, load_partition

pytestmark = pytest.mark.usefixtures("fresh_data_caches")


def _assert_pinned(split, size: int, ids: list[int], labels: list[int]) -> None:
    assert len(split) == size
    assert split.ids[: len(ids)].tolist() == ids
    assert split.labels[: len(labels)].tolist() == labels


# (dataset, partition_id, num_partitions, partitioner, options), then for train and
# test: the split's size, its first five ids and their labels
OFFLINE = [
    (
        ("digits", 0, 4, "iid", {"seed": 42}),
        (360, [420, 265, 436, 252, 260], [6, 9, 2, 0, 4]),
        (90, [337, 183, 174, 197, 231], [7, 8, 7, 6, 3]),
    ),
    (
        ("digits", 1, 3, "dirichlet", {"dirichlet_alpha": 0.5, "seed": 7}),
        (498, [1169, 1283, 1536, 1157, 1457], [2, 0, 4, 0, 1]),
        (124, [268, 284, 1432, 1377, 917], [2, 8, 7, 1, 2]),
    ),
    (
        ("digits", 2, 5, "pathological", {"seed": 3}),
        (120, [606, 1097, 340, 437, 826], [1, 1, 2, 2, 2]),
        (30, [502, 1112, 600, 700, 501], [2, 1, 2, 2, 2]),
    ),
    (
        ("synthetic", 0, 3, "iid", {"seed": 0}),
        (160, [116, 89, 10, 172, 13], [4, 4, 1, 7, 8]),
        (40, [105, 6, 168, 90, 65], [9, 8, 0, 8, 6]),
    ),
]


@pytest.mark.parametrize(("args", "train", "test"), OFFLINE, ids=lambda v: str(v[:4]))
def test_offline_data_sets_keep_their_ids(args, train, test) -> None:
    # Prepare
    name, partition_id, num_partitions, partitioner, options = args
    # Execute
    part = load_partition(name, partition_id, num_partitions, partitioner, **options)
    # Assert
    _assert_pinned(part.train, *train)
    _assert_pinned(part.test, *test)
    assert part.train.augmentation is None and part.test.augmentation is None
    full, _ = load_dataset(name, options["seed"])
    for split in (part.train, part.test):
        # an id is the sample's index in the whole set
        assert np.array_equal(full.labels[split.ids].numpy(), split.labels.numpy())
        assert bool((full.images[split.ids] == split.images).all())


@pytest.mark.parametrize("point_at", ["parent", "batches-folder"])
def test_cifar10_local_copy_keeps_its_ids(tmp_path: Path, monkeypatch, point_at) -> None:
    # Prepare: 40 training images (ids 0..39), 10 test images (ids 40..49)
    write_cifar10(tmp_path, per_batch=8, num_test=10)
    folder = tmp_path / "cifar-10-batches-py"
    accept_fake_copy(monkeypatch, folder)
    data_dir = str(tmp_path if point_at == "parent" else folder)
    # Execute
    iid = load_partition("cifar10", 0, 3, "iid", seed=1, data_dir=data_dir)
    dirichlet = load_partition(
        "cifar10", 2, 3, "dirichlet", 0.5, seed=5, min_partition_size=0, data_dir=data_dir
    )
    # Assert
    _assert_pinned(iid.train, 14, [9, 23, 17, 28, 0], [9, 3, 7, 8, 0])
    _assert_pinned(iid.test, 4, [48, 44, 47, 40], [8, 4, 7, 0])
    _assert_pinned(dirichlet.train, 14, [4, 1, 24, 3, 11], [4, 1, 4, 3, 1])
    _assert_pinned(dirichlet.test, 3, [49, 45, 48], [9, 5, 8])
    for part in (iid, dirichlet):
        for split in (part.train, part.test):
            # each image carries its index in train + test: training index, or
            # training-split size + test index
            assert np.array_equal(_decoded_ids(split.images, "cifar10"), split.ids.numpy())


def test_cifar100_local_copy_keeps_its_ids(tmp_path: Path, monkeypatch) -> None:
    # Prepare: 200 training images (ids 0..199), 100 test images (ids 200..299)
    write_cifar100(tmp_path)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-100-python")
    # Execute
    part = load_partition("cifar100", 1, 2, "iid", seed=0, data_dir=str(tmp_path))
    # Assert
    _assert_pinned(part.train, 100, [196, 164, 11, 188, 103], [96, 64, 11, 88, 3])
    _assert_pinned(part.test, 50, [280, 203, 201, 255, 253], [80, 3, 1, 55, 53])
    for split in (part.train, part.test):
        assert np.array_equal(_decoded_ids(split.images, "cifar100"), split.ids.numpy())


def test_cinic10_local_copy_keeps_its_ids(tmp_path: Path) -> None:
    # Prepare: 3 training and 2 test images per class; ids follow the class
    # folders in order, then the file names: training ids 0..29, test ids 30..49
    write_cinic10(tmp_path, {"train": 3, "valid": 1, "test": 2})
    # Execute
    part = load_partition("cinic10", 0, 2, "iid", seed=0, data_dir=str(tmp_path))
    # Assert
    _assert_pinned(part.train, 15, [2, 11, 26, 21, 10], [0, 3, 8, 7, 3])
    _assert_pinned(part.test, 10, [34, 49, 36, 32, 43], [2, 9, 3, 1, 6])
    for split, first_id, per_class in ((part.train, 0, 3), (part.test, 30, 2)):
        index_in_class = (split.ids - first_id - per_class * split.labels).numpy()
        assert ((0 <= index_in_class) & (index_in_class < per_class)).all()
        # every image was filled with 20 * label + its index in the class folder
        raw = _raw_pixels(split.images, "cinic10")[:, 0, 0, 0].astype(np.int64)
        assert np.array_equal(raw, 20 * split.labels.numpy() + index_in_class)
