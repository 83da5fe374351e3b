"""The public loaders: a whole data set, its description, one node's partition.

``digits`` / ``synthetic`` are built in memory (:mod:`.offline`); the image data sets
come from a local copy (:mod:`.local`) when ``data_dir`` is set, else from the Hub
(:mod:`.hub`). Either way an image data set's splits become normalised tensors here:
``ToTensor()`` scaling to [0, 1], then torchvision's ``normalize`` with the data
set's channel statistics; a training split carries :class:`RandomCropFlip`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from . import hub
from .augment import RandomCropFlip
from .catalog import IMAGE_DATASETS, ImageDatasetSpec
from .local import local_arrays, local_partitioners
from .offline import DATASETS, offline_labels
from .partitions import SAMPLE_ID, load_partition_column, partition_indices
from .samples import DatasetInfo, Partition, SampleSet

__all__ = [
    "PartitionError",
    "check_partitions",
    "offline_size",
    "DATASET_NAMES",
    "TEST_FRACTION",
    "check_name",
    "clear_caches",
    "describe_dataset",
    "load_dataset",
    "load_partition",
]

TEST_FRACTION = 0.2

DATASET_NAMES = (*DATASETS, *IMAGE_DATASETS)


class PartitionError(ValueError):
    """A data set cannot be split into the requested partitions. The message names
    the data set, its size, the partitions asked for and what to change."""


def offline_size(dataset: str, num_partitions: int, samples_per_node: int = 0) -> int:
    """How many samples an in-memory data set has for a run: for ``synthetic``,
    ``samples_per_node * num_partitions`` (``samples_per_node`` 0:
    :data:`~flwr_fedgkt.data.offline.SYNTHETIC_SAMPLES` in all); 0 for a data set
    of fixed size (build it with ``num_samples=0``)."""
    if samples_per_node < 0:
        raise ValueError(f"samples per node must not be negative, got {samples_per_node}")
    if dataset == "synthetic" and samples_per_node:
        return samples_per_node * num_partitions
    return 0


def check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one of :data:`DATASET_NAMES`."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def _to_sample_set(
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    spec: ImageDatasetSpec,
    augment: bool = False,
) -> SampleSet:
    """uint8 N x H x W x C images -> ``ToTensor()`` (divide by 255) then torchvision's
    ``normalize(mean, std)``."""
    import torchvision.transforms.v2.functional as tvf

    raw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    scaled = raw.float().div_(255.0)
    normalised = tvf.normalize(scaled, list(spec.mean), list(spec.std), inplace=True)
    return SampleSet(
        normalised.contiguous(),
        torch.as_tensor(labels, dtype=torch.long),
        torch.as_tensor(ids, dtype=torch.long),
        RandomCropFlip(spec.mean, spec.std) if augment else None,
    )


def _image_partition(
    name: str,
    data_dir: str,
    partition_id: int,
    num_partitions: int,
    options: tuple[str, float, int, int, int],
) -> Partition:
    spec = IMAGE_DATASETS[name]
    sets = {}
    if data_dir:
        arrays = local_arrays(name, data_dir)
        parts = local_partitioners(name, data_dir, num_partitions, *options)
        num_train = len(arrays.train_labels)
        for split, images, labels, offset in (
            ("train", arrays.train_images, arrays.train_labels, 0),
            ("test", arrays.test_images, arrays.test_labels, num_train),
        ):
            ids = load_partition_column(parts[split], partition_id, SAMPLE_ID)
            rows = ids - offset
            sets[split] = _to_sample_set(
                images[rows], labels[rows], ids, spec, augment=split == "train"
            )
    else:
        key = (name, num_partitions, *options)
        for split in ("train", "test"):
            sets[split] = _to_sample_set(
                *hub.node_arrays(key, partition_id, split), spec, augment=split == "train"
            )
    return Partition(train=sets["train"], test=sets["test"], num_classes=spec.num_classes)


@lru_cache(maxsize=4)
def load_dataset(
    name: str, seed: int = 0, data_dir: str = "", num_samples: int = 0
) -> tuple[SampleSet, int]:
    """The whole data set ``name`` and its number of classes.

    For the image data sets this is the training split (normalised), read from
    ``data_dir`` when set, else from the Hub; it raises
    :class:`DataUnavailableError` when neither works. ``num_samples`` sizes
    ``synthetic`` (0: its default size; see :func:`offline_size`).
    """
    check_name(name)
    if name in DATASETS:
        return DATASETS[name](seed, num_samples)
    spec = IMAGE_DATASETS[name]
    if data_dir:
        arrays = local_arrays(name, data_dir)
        images, labels = arrays.train_images, arrays.train_labels
    else:
        train = hub.federated_dataset(name, 1, "iid", 0.5, 2, 0, seed).load_split("train")
        train = train.sort(SAMPLE_ID)
        images = hub.decode_images(train, spec.image_column)
        labels = np.asarray(train[spec.label_column], dtype=np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    return _to_sample_set(images, labels, ids, spec), spec.num_classes


def describe_dataset(
    name: str, data_dir: str = "", seed: int = 0, num_samples: int = 0
) -> DatasetInfo:
    """Class count and split sizes of ``name``, checking that it can be loaded
    (``num_samples`` sizes ``synthetic``, as in :func:`load_dataset`).

    Reads a local copy when ``data_dir`` is set (no network access), else fetches
    the image data sets from the Hub (or the Hugging Face cache).

    Raises
    ------
    DataUnavailableError
        When an image data set is available neither locally nor from the Hub.
    ValueError
        When ``name`` is unknown.
    """
    check_name(name)
    if name in DATASETS:  # labels only: the server need not hold the images
        labels, num_classes = offline_labels(name, seed, num_samples)
        return DatasetInfo(name, num_classes, len(labels), 0, "in memory")
    spec = IMAGE_DATASETS[name]
    if data_dir:
        arrays = local_arrays(name, data_dir)
        num_train, num_test = len(arrays.train_labels), len(arrays.test_labels)
        source = f"local copy in {data_dir}"
    else:
        fds = hub.federated_dataset(name, 1, "iid", 0.5, 2, 0, seed)
        num_train, num_test = len(fds.load_split("train")), len(fds.load_split("test"))
        source = f"Hugging Face Hub {spec.hub_id}"
    return DatasetInfo(name, spec.num_classes, num_train, num_test, source)


@lru_cache(maxsize=8)
def _all_partitions(
    dataset: str,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    seed: int,
    classes_per_partition: int,
    min_partition_size: int,
    num_samples: int,
) -> tuple[np.ndarray, ...]:
    """Every partition's sample indices of an in-memory data set, each with a
    training and a test sample (else :class:`PartitionError`)."""
    labels, _ = offline_labels(dataset, seed, num_samples)
    size = f"{dataset} ({len(labels)} samples)"
    hint = (
        "; set synthetic-samples-per-node to the samples each node should hold"
        if dataset == "synthetic"
        else "; use fewer nodes"
    )
    if len(labels) < 2 * num_partitions:
        raise PartitionError(
            f"{size} cannot be split into {num_partitions} partitions: every partition "
            f"needs at least 2 samples (one to train on, one to test on){hint}"
        )
    try:
        parts = partition_indices(
            labels,
            num_partitions,
            partitioner,
            dirichlet_alpha,
            seed,
            classes_per_partition=classes_per_partition,
            min_partition_size=min_partition_size,
        )
    except ValueError as err:
        if partitioner == "dirichlet":
            hint = "; lower min-partition-size, raise dirichlet-alpha or use fewer nodes"
        raise PartitionError(
            f"{size} cannot be split into {num_partitions} {partitioner} partitions: {err}{hint}"
        ) from None
    small = [i for i, part in enumerate(parts) if len(part) < 2]
    if small:
        raise PartitionError(
            f"{size} split into {num_partitions} {partitioner} partitions leaves "
            f"{len(small)} of them with fewer than 2 samples (partition {small[0]} has "
            f"{len(parts[small[0]])}){hint}"
        )
    return tuple(parts)


def check_partitions(
    dataset: str,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
    *,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    data_dir: str = "",
    synthetic_samples_per_node: int = 0,
) -> str:
    """Check, before a run starts, that ``dataset`` splits into ``num_partitions``
    partitions as :func:`load_partition` splits it; one line saying how it splits.

    An in-memory data set is partitioned here exactly as every node will
    partition it (labels only, no images); an image data set needs at least one
    training and one test image per partition.

    Raises
    ------
    PartitionError
        When it cannot be split; the message says why and what to change.
    DataUnavailableError
        When an image data set is available neither locally nor from the Hub.
    """
    check_name(dataset)
    if num_partitions < 1:
        raise PartitionError(f"{dataset} cannot be split into {num_partitions} partitions")
    if dataset in IMAGE_DATASETS:
        info = describe_dataset(dataset, data_dir=data_dir, seed=seed)
        if min(info.num_train, info.num_test) < num_partitions:
            raise PartitionError(
                f"{dataset} ({info.num_train} training / {info.num_test} test images) "
                f"cannot be split into {num_partitions} partitions: every partition "
                "needs at least one training and one test image; use fewer nodes"
            )
        return f"{dataset}: {num_partitions} {partitioner} partitions of the training split"
    num_samples = offline_size(dataset, num_partitions, synthetic_samples_per_node)
    sizes = [
        len(part)
        for part in _all_partitions(
            dataset,
            num_partitions,
            partitioner,
            float(dirichlet_alpha),
            seed,
            int(classes_per_partition),
            int(min_partition_size),
            num_samples,
        )
    ]
    return (
        f"{dataset}: {sum(sizes)} samples in {num_partitions} {partitioner} partitions "
        f"of {min(sizes)} to {max(sizes)} samples"
    )


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
    *,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    data_dir: str = "",
    synthetic_samples_per_node: int = 0,
) -> Partition:
    """Node ``partition_id``'s data.

    Parameters
    ----------
    dataset : str
        One of :data:`DATASET_NAMES`.
    partition_id, num_partitions : int
        This node's partition and the number of partitions.
    partitioner, dirichlet_alpha, classes_per_partition, min_partition_size, seed
        See :func:`build_partitioner`; ``seed`` also seeds the shuffles and splits.
    data_dir : str (default: "")
        Local copy of an image data set; empty: the Hub.
    synthetic_samples_per_node : int (default: 0)
        ``synthetic`` holds this many samples per partition
        (``num_partitions`` times as many in all); 0: its default size. Other
        data sets have a size of their own.

    Raises
    ------
    PartitionError
        When an in-memory data set cannot be split into ``num_partitions``
        partitions of at least 2 samples each (:func:`check_partitions`).

    Returns
    -------
    Partition
        ``digits`` / ``synthetic``: the node's partition split 80/20 into train and
        test (seeded). Image data sets: the node's partition of the training split,
        its IID share of the test split, and the training augmentation.
    """
    check_name(dataset)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is out of range for {num_partitions} partitions"
        )
    if dataset in IMAGE_DATASETS:
        options = (
            partitioner,
            float(dirichlet_alpha),
            int(classes_per_partition),
            int(min_partition_size),
            seed,
        )
        return _image_partition(dataset, data_dir, partition_id, num_partitions, options)
    num_samples = offline_size(dataset, num_partitions, synthetic_samples_per_node)
    index = _all_partitions(
        dataset,
        num_partitions,
        partitioner,
        float(dirichlet_alpha),
        seed,
        int(classes_per_partition),
        int(min_partition_size),
        num_samples,
    )[partition_id]
    full, num_classes = load_dataset(dataset, seed, num_samples=num_samples)
    rng = np.random.default_rng([seed, partition_id])
    index = rng.permutation(index)
    # at least one sample each (a partition has two or more)
    num_test = min(max(int(round(TEST_FRACTION * len(index))), 1), len(index) - 1)
    return Partition(
        train=full.subset(index[num_test:]),
        test=full.subset(index[:num_test]),
        num_classes=num_classes,
    )


def clear_caches() -> None:
    """Forget the data sets and partitions this process has loaded."""
    for cached in (
        load_dataset,
        _all_partitions,
        local_arrays,
        local_partitioners,
        hub.federated_dataset,
        hub.node_arrays,
    ):
        cached.cache_clear()
