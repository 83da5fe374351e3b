"""Data sets and partitions for FedGKT (and the FedAvg baseline).

Every sample carries a stable integer *sample id*, so that knowledge-distillation
targets can be looked up by id rather than by batch position.

Data sets
---------
``digits``
    scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes),
    upsampled to 32x32x3. Ships inside an installed package: no network needed.
    The default.
``synthetic``
    Seeded class-template images with noise, for tests and scale runs: 600 in all,
    or ``synthetic_samples_per_node`` per partition (run config
    ``synthetic-samples-per-node``), so that any number of nodes gets real
    partitions.
``cifar10``, ``cifar100``, ``cinic10``
    The paper's data sets, from the Hugging Face Hub through flwr-datasets'
    ``FederatedDataset`` (``uoft-cs/cifar10``, ``uoft-cs/cifar100``,
    ``flwrlabs/cinic10``), or, with ``data_dir``, from a local copy in the standard
    layout, read with torchvision (``datasets.CIFAR10`` / ``CIFAR100`` on the
    ``cifar-10-batches-py`` / ``cifar-100-python`` pickles, checked against the
    published MD5 checksums; ``datasets.ImageFolder`` on CINIC-10's
    ``train/<class>/*.png`` and ``test/<class>/*.png``) with no network access at all.

Partitions and splits
---------------------
Partitions come from flwr-datasets' partitioners (``iid``, ``dirichlet``,
``pathological``): ``iid`` cuts contiguous shards in the order the data come
(the image data sets shuffled with the seed first; ``digits`` in file order,
the same for every seed), the other two are seeded.

* ``digits`` / ``synthetic`` have no test split: each node's partition of the whole
  set is split 80/20 into train and test (seeded). Sample id = index in the set.
* The image data sets keep their own test split. The training split is partitioned
  with the chosen partitioner; the test split is divided IID over the same number
  of nodes, so that with every node evaluating, the reported accuracy is the
  accuracy on the whole test split. Sample id = index in the training split for
  training images, and ``len(train split) + index in the test split`` for test
  images, so the two never collide. Both splits are shuffled (seeded) *after* the
  ids are assigned and before partitioning, and a local copy goes through exactly
  the same steps as the Hub's copy: the same labels in the same order give the
  same partitions.

Images are normalised with the data set's channel mean and standard deviation;
:class:`RandomCropFlip` (torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()``, seeded from the round's generator) is the training
augmentation of the image data sets (none at test time, none for ``digits`` /
``synthetic``).

When an image data set can be obtained neither from ``data_dir`` nor from the Hub,
loading raises :class:`DataUnavailableError` with one message that says what was
tried and how to fix it. When a data set cannot be split into the partitions asked
for (every partition needs a training and a test sample), loading raises
:class:`PartitionError`, and :func:`check_partitions` says so before a run starts.

Modules
-------
``samples``     :class:`SampleSet`, :class:`Partition`, :class:`DatasetInfo`
``catalog``     the image data sets' sources and the "not available" message
``offline``     ``digits`` and ``synthetic``
``partitions``  flwr-datasets partitioners; sample-id numbering
``local``       local copies (torchvision's CIFAR10 / CIFAR100 / ImageFolder)
``hub``         the Hugging Face Hub through ``FederatedDataset``
``augment``     :class:`RandomCropFlip`
``loaders``     :func:`load_dataset`, :func:`describe_dataset`, :func:`load_partition`
``plots``       :func:`plot_label_distribution`

This package imports no Flower code (flwr-datasets is a data library, not the
Flower runtime), and imports torchvision, flwr-datasets and scikit-learn only when
a data set needs them.
"""

from __future__ import annotations

from .augment import RandomCropFlip
from .catalog import CINIC10_CLASSES, IMAGE_DATASETS, DataUnavailableError, ImageDatasetSpec
from .loaders import (
    DATASET_NAMES,
    PartitionError,
    check_partitions,
    clear_caches,
    describe_dataset,
    load_dataset,
    load_partition,
    offline_size,
)
from .offline import DATASETS
from .partitions import PARTITIONERS, build_partitioner, partition_indices
from .plots import plot_label_distribution
from .samples import Augmentation, DatasetInfo, Partition, SampleSet

__all__ = [
    "Augmentation",
    "SampleSet",
    "Partition",
    "DatasetInfo",
    "ImageDatasetSpec",
    "DataUnavailableError",
    "PartitionError",
    "RandomCropFlip",
    "CINIC10_CLASSES",
    "DATASETS",
    "IMAGE_DATASETS",
    "DATASET_NAMES",
    "PARTITIONERS",
    "load_dataset",
    "load_partition",
    "check_partitions",
    "offline_size",
    "partition_indices",
    "build_partitioner",
    "describe_dataset",
    "plot_label_distribution",
    "clear_caches",
]
