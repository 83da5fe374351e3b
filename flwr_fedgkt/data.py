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
    Seeded class-template images with noise, for tests.
``cifar10``, ``cifar100``, ``cinic10``
    The paper's data sets, from the Hugging Face Hub through flwr-datasets'
    ``FederatedDataset`` (``uoft-cs/cifar10``, ``uoft-cs/cifar100``,
    ``flwrlabs/cinic10``), or, with ``data_dir``, from a local copy in the standard
    layout (torchvision's ``cifar-10-batches-py`` / ``cifar-100-python`` pickles,
    CINIC-10's ``train/<class>/*.png`` and ``test/<class>/*.png`` folders) with
    no network access at all.

Partitions and splits
---------------------
Partitions come from flwr-datasets' partitioners (``iid``, ``dirichlet``,
``pathological``), seeded.

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
:class:`RandomCropFlip` is the training augmentation of the image data sets (none
at test time, none for ``digits`` / ``synthetic``).

When an image data set can be obtained neither from ``data_dir`` nor from the Hub,
loading raises :class:`DataUnavailableError` with one message that says what was
tried and how to fix it.

This module imports no Flower code (flwr-datasets is a data library, not the
Flower runtime).
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import Partitioner

__all__ = [
    "Augmentation",
    "SampleSet",
    "Partition",
    "DatasetInfo",
    "ImageDatasetSpec",
    "DataUnavailableError",
    "RandomCropFlip",
    "DATASETS",
    "IMAGE_DATASETS",
    "DATASET_NAMES",
    "PARTITIONERS",
    "load_dataset",
    "load_partition",
    "partition_indices",
    "build_partitioner",
    "describe_dataset",
    "plot_label_distribution",
    "clear_caches",
]

TEST_FRACTION = 0.2
SAMPLE_ID = "sample_id"
HUB_PROBE_TIMEOUT = 5.0


class DataUnavailableError(RuntimeError):
    """A data set can be loaded neither from a local copy nor from the network.

    The message names the data set, what was tried and how to fix it.
    """


Augmentation = Callable[[Tensor, torch.Generator | None], Tensor]
"""Per-sample augmentation of a batch: ``augment(images, generator) -> images``, the
same batch size and order; random draws come from ``generator`` when given."""


@dataclass(frozen=True)
class SampleSet:
    """Images with their labels and stable sample ids (all on the CPU).

    ``augmentation`` is how training augments batches of these images (``None``:
    not at all); a training split carries it, a test split does not. Images are
    stored un-augmented; training applies it per batch, feature extraction never.
    """

    images: Tensor  # N x 3 x 32 x 32, float32, normalised
    labels: Tensor  # N, int64
    ids: Tensor  # N, int64, unique
    augmentation: Augmentation | None = field(default=None, compare=False)

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
        return SampleSet(self.images[index], self.labels[index], self.ids[index], self.augmentation)


class RandomCropFlip:
    """The reference code's training augmentation, drawn per image.

    Each image is padded by ``padding`` pixels of black and cropped back to its size
    at a random offset, then flipped horizontally with probability
    ``flip_probability``: torchvision's ``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``. It works on *normalised* batches (``B x C x H x W``):
    the padding takes the normalised value of black, ``-mean / std``, so the result
    equals augmenting the raw image and normalising it afterwards. Every image of a
    batch gets its own crop offset and flip; the random draws come from the
    ``generator`` passed in, so a seeded run is reproducible.

    Parameters
    ----------
    mean : tuple[float, ...]
        Channel means the images were normalised with.
    std : tuple[float, ...]
        Channel standard deviations the images were normalised with.
    padding : int (default: 4)
        Pixels of padding on each side before cropping.
    flip_probability : float (default: 0.5)
        Probability of a horizontal flip.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        padding: int = 4,
        flip_probability: float = 0.5,
    ) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.padding = padding
        self.flip_probability = flip_probability
        self.fill = [-m / s for m, s in zip(self.mean, self.std, strict=True)]

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip_probability={self.flip_probability})"

    def parameters(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Random ``(top, left, flip)`` of every image of a batch."""
        offsets = torch.randint(0, 2 * self.padding + 1, (2, batch_size), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < self.flip_probability
        return offsets[0], offsets[1], flip

    def apply(self, images: Tensor, top: Tensor, left: Tensor, flip: Tensor) -> Tensor:
        """Crop every image at its ``(top, left)`` of the padded image; flip where
        ``flip`` is set."""
        _, channels, height, width = images.shape
        out = torch.empty_like(images)
        fill = torch.tensor(self.fill, dtype=images.dtype, device=images.device)
        fill = fill.view(channels, 1, 1).expand(channels, height, width)
        # image by image, with small copies only: no padded batch is built, and no
        # operation is large enough to wait on the intra-op thread pool
        rows, cols, flips = top.tolist(), left.tolist(), flip.tolist()
        for i, (row, col, flipped) in enumerate(zip(rows, cols, flips, strict=True)):
            dy, dx = row - self.padding, col - self.padding  # crop origin in the image
            r0, r1 = max(dy, 0), min(dy + height, height)
            c0, c1 = max(dx, 0), min(dx + width, width)
            crop = out[i]
            if r1 - r0 < height or c1 - c0 < width:
                crop.copy_(fill)
            crop[:, r0 - dy : r1 - dy, c0 - dx : c1 - dx] = images[i, :, r0:r1, c0:c1]
            if flipped:
                crop.copy_(crop.flip(-1))
        return out

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch; sample order (and so the sample ids) is unchanged."""
        return self.apply(images, *self.parameters(images.shape[0], generator))


@dataclass(frozen=True)
class Partition:
    """One node's data: its train and test split, and the data set's class count."""

    train: SampleSet
    test: SampleSet
    num_classes: int


@dataclass(frozen=True)
class DatasetInfo:
    """What the server needs to know about a data set before a run starts."""

    name: str
    num_classes: int
    num_train: int
    num_test: int
    source: str

    def summary(self) -> str:
        """One line for a log."""
        if self.num_test == 0:
            sizes = f"{self.num_train} images, each node's partition split 80/20"
        else:
            sizes = f"{self.num_train} training / {self.num_test} test images"
        return f"{self.name}: {self.num_classes} classes, {sizes} ({self.source})"


@dataclass(frozen=True)
class ImageDatasetSpec:
    """Where one of the paper's image data sets comes from and how to read it.

    Parameters
    ----------
    title : str
        Name for people (``CIFAR-10``).
    hub_id : str
        Hugging Face Hub id, as ``FederatedDataset(dataset=...)`` takes it.
    image_column, label_column : str
        Columns of the Hub's copy.
    num_classes : int
        Classes of ``label_column``.
    mean, std : tuple[float, float, float]
        Channel statistics of the training split (images scaled to [0, 1]).
    layout : str
        Local layout: ``cifar10``, ``cifar100`` (torchvision's pickles) or
        ``image-folder`` (``train/<class>/*.png``, ``test/<class>/*.png``).
    local_folder : str
        What ``data_dir`` must hold, for messages.
    download : str
        Where a local copy comes from, for messages.
    """

    title: str
    hub_id: str
    image_column: str
    label_column: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str
    local_folder: str
    download: str


IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "cifar10": ImageDatasetSpec(
        title="CIFAR-10",
        hub_id="uoft-cs/cifar10",
        image_column="img",
        label_column="label",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        layout="cifar10",
        local_folder="cifar-10-batches-py/ (data_batch_1 ... data_batch_5, test_batch)",
        download="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": ImageDatasetSpec(
        title="CIFAR-100",
        hub_id="uoft-cs/cifar100",
        image_column="img",
        label_column="fine_label",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        layout="cifar100",
        local_folder="cifar-100-python/ (train, test)",
        download="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
    "cinic10": ImageDatasetSpec(
        title="CINIC-10",
        hub_id="flwrlabs/cinic10",
        image_column="image",
        label_column="label",
        num_classes=10,
        mean=(0.4789, 0.4723, 0.4305),
        std=(0.2421, 0.2383, 0.2587),
        layout="image-folder",
        local_folder="train/<class>/*.png and test/<class>/*.png (valid/ is not used)",
        download="https://datashare.ed.ac.uk/handle/10283/3192 (CINIC-10.tar.gz)",
    ),
}

CINIC10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

PARTITIONERS = ("iid", "dirichlet", "pathological")


# -- the offline data sets -------------------------------------------------------------
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

DATASET_NAMES = (*DATASETS, *IMAGE_DATASETS)


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


# -- partitioners ----------------------------------------------------------------------
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
        ``iid`` (``IidPartitioner``: equal contiguous shards of the shuffled data),
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


def _load_partition_column(part: Partitioner, partition_id: int, column: str) -> np.ndarray:
    try:
        return np.asarray(part.load_partition(partition_id)[column], dtype=np.int64)
    except ValueError as err:  # e.g. no Dirichlet draw met min_partition_size
        raise ValueError(f"partitioning failed: {err}") from None


def _index_partitioner(
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
    part = _index_partitioner(
        labels,
        num_partitions,
        partitioner,
        dirichlet_alpha,
        seed,
        classes_per_partition,
        min_partition_size,
    )
    return [_load_partition_column(part, i, "index") for i in range(num_partitions)]


# -- image data sets: local copies -----------------------------------------------------
@dataclass(frozen=True)
class _ImageArrays:
    """A data set's splits as stored: uint8 images, N x 32 x 32 x 3 (HWC)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None


def _unavailable(name: str, tried: list[str]) -> DataUnavailableError:
    spec = IMAGE_DATASETS[name]
    lines = [f"Data set {name!r} ({spec.title}) is not available."]
    lines += [f"  Tried: {attempt}" for attempt in tried]
    lines += [
        "  Fix: copy it to this machine (from "
        f"{spec.download}), unpack it so that a folder holds {spec.local_folder}, and "
        "pass that folder's absolute path as run-config data-dir, e.g. "
        "--run-config \"data-dir='/data/" + name + "'\";",
        "       or run the offline data set: --run-config \"dataset='digits'\".",
    ]
    return DataUnavailableError("\n".join(lines))


def _read_pickle(path: Path) -> dict[str, Any]:
    # the CIFAR archives are pickles written by Python 2: latin1 keeps their str keys
    with open(path, "rb") as handle:
        content = pickle.load(handle, encoding="latin1")
    if not isinstance(content, dict):
        raise ValueError(f"{path} does not hold a dict")
    return content


def _cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = _read_pickle(path)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected N x 3072")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
        if len(labels[-1]) != len(images[-1]):
            raise ValueError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_cifar(root: Path, layout: str) -> _ImageArrays:
    if layout == "cifar10":
        folder, label_key = "cifar-10-batches-py", "labels"
        train = [f"data_batch_{i}" for i in range(1, 6)]
        test, meta, names_key = ["test_batch"], "batches.meta", "label_names"
    else:
        folder, label_key = "cifar-100-python", "fine_labels"
        train, test, meta, names_key = ["train"], ["test"], "meta", "fine_label_names"
    base = root / folder if (root / folder).is_dir() else root
    missing = [name for name in (*train, *test) if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{base} lacks {', '.join(missing)}")
    train_images, train_labels = _cifar_batches([base / n for n in train], label_key)
    test_images, test_labels = _cifar_batches([base / n for n in test], label_key)
    names = None
    if (base / meta).is_file():
        names = tuple(str(n) for n in _read_pickle(base / meta).get(names_key, ())) or None
    return _ImageArrays(train_images, train_labels, test_images, test_labels, names)


def _read_png_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    missing = [c for c in CINIC10_CLASSES if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the class folders {', '.join(missing)}")
    images, labels = [], []
    for label, name in enumerate(CINIC10_CLASSES):
        for path in sorted((folder / name).glob("*.png")):
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            if array.shape != (32, 32, 3):
                raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected 32x32")
            images.append(array)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"{folder} holds no PNG images")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _read_image_folder(root: Path) -> _ImageArrays:
    for candidate in (root, root / "CINIC-10", root / "cinic-10"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            root = candidate
            break
    else:
        raise FileNotFoundError(f"{root} has no train/ and test/ folders")
    train_images, train_labels = _read_png_split(root / "train")
    test_images, test_labels = _read_png_split(root / "test")
    return _ImageArrays(train_images, train_labels, test_images, test_labels, CINIC10_CLASSES)


@lru_cache(maxsize=2)
def _local_arrays(name: str, data_dir: str) -> _ImageArrays:
    spec = IMAGE_DATASETS[name]
    root = Path(data_dir).expanduser()
    try:
        if not root.is_dir():
            raise FileNotFoundError("no such directory")
        if spec.layout == "image-folder":
            arrays = _read_image_folder(root)
        else:
            arrays = _read_cifar(root, spec.layout)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as err:
        reason = f"{type(err).__name__}: {err}" if isinstance(err, KeyError) else str(err)
        raise _unavailable(
            name, [f"data-dir {str(root)!r}, expecting {spec.local_folder}: {reason}"]
        ) from None
    for split, labels in (("train", arrays.train_labels), ("test", arrays.test_labels)):
        if labels.size and not 0 <= labels.min() <= labels.max() < spec.num_classes:
            raise _unavailable(
                name,
                [
                    f"data-dir {str(root)!r}: {split} labels lie outside "
                    f"0..{spec.num_classes - 1}; is this a copy of {spec.title}?"
                ],
            )
    return arrays


# -- image data sets: the Hub, through FederatedDataset --------------------------------
def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """``None`` when the Hub answers within ``timeout`` seconds, else the reason."""
    request = urllib.request.Request(_hub_endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return str(reason)


def _with_sample_ids(seed: int) -> Callable[[DatasetDict], DatasetDict]:
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


def _hub_error(name: str, reason: str) -> DataUnavailableError:
    spec = IMAGE_DATASETS[name]
    hint = (
        ""
        if _hub_offline()
        else "; a copy in the Hugging Face cache is used only with HF_HUB_OFFLINE=1"
    )
    return _unavailable(
        name,
        [
            "no data-dir set",
            f"the Hugging Face Hub ({spec.hub_id!r} through flwr-datasets' "
            f"FederatedDataset): {reason}{hint}",
        ],
    )


@lru_cache(maxsize=2)
def _federated_dataset(
    name: str,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> FederatedDataset:
    """The Hub's copy with this run's partitioners; downloaded (or read from the
    Hugging Face cache) and checked here, so that a failure surfaces at once."""
    from flwr_datasets import FederatedDataset

    spec = IMAGE_DATASETS[name]
    if not _hub_offline():
        reason = _hub_reachable()
        if reason is not None:
            raise _hub_error(name, f"{_hub_endpoint()} is unreachable ({reason})")
    fds = FederatedDataset(
        dataset=spec.hub_id,
        partitioners={
            "train": build_partitioner(
                partitioner,
                num_partitions,
                label_column=spec.label_column,
                dirichlet_alpha=dirichlet_alpha,
                classes_per_partition=classes_per_partition,
                min_partition_size=min_partition_size,
                seed=seed,
            ),
            "test": build_partitioner("iid", num_partitions),
        },
        preprocessor=_with_sample_ids(seed),
        shuffle=False,  # the preprocessor shuffles, after numbering the samples
    )
    try:
        fds.load_split("train")
    except Exception as err:  # any failure to fetch means: not available
        summary = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise _hub_error(name, f"{type(err).__name__}: {summary}") from None
    return fds


def _decode_images(split: Dataset, column: str) -> np.ndarray:
    from datasets import Image

    if column not in split.column_names:  # fall back on the split's image column
        column = next(c for c, f in split.features.items() if isinstance(f, Image))
    images = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in split[column]]
    if not images:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    return np.stack(images)


# -- image data sets: partitions -------------------------------------------------------
def _label_splits(arrays: _ImageArrays, label_column: str) -> DatasetDict:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    label = ClassLabel(names=list(arrays.class_names)) if arrays.class_names else Value("int64")
    features = Features({label_column: label})
    return DatasetDict(
        {
            "train": Dataset.from_dict({label_column: arrays.train_labels}, features=features),
            "test": Dataset.from_dict({label_column: arrays.test_labels}, features=features),
        }
    )


@lru_cache(maxsize=4)
def _local_partitioners(
    name: str,
    data_dir: str,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
) -> dict[str, Partitioner]:
    """The partitioners of a local copy, assigned to its (sample id, label) table:
    the steps ``FederatedDataset`` takes for the Hub's copy, without the images."""
    spec = IMAGE_DATASETS[name]
    splits = _with_sample_ids(seed)(_label_splits(_local_arrays(name, data_dir), spec.label_column))
    parts = {
        "train": build_partitioner(
            partitioner,
            num_partitions,
            label_column=spec.label_column,
            dirichlet_alpha=dirichlet_alpha,
            classes_per_partition=classes_per_partition,
            min_partition_size=min_partition_size,
            seed=seed,
        ),
        "test": build_partitioner("iid", num_partitions),
    }
    for split, part in parts.items():
        part.dataset = splits[split]
    return parts


def _to_sample_set(
    images: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    spec: ImageDatasetSpec,
    augment: bool = False,
) -> SampleSet:
    """uint8 N x H x W x C images -> ``ToTensor()`` then ``Normalize(mean, std)``
    (torchvision's transforms, computed here without importing torchvision)."""
    raw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    normalised = raw.float().div_(255.0).sub_(mean).div_(std)
    return SampleSet(
        normalised.contiguous(),
        torch.as_tensor(labels, dtype=torch.long),
        torch.as_tensor(ids, dtype=torch.long),
        RandomCropFlip(spec.mean, spec.std) if augment else None,
    )


@lru_cache(maxsize=16)
def _hub_node_arrays(
    key: tuple[Any, ...], partition_id: int, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spec = IMAGE_DATASETS[key[0]]
    part = _federated_dataset(*key).load_partition(partition_id, split)
    ids = np.asarray(part[SAMPLE_ID], dtype=np.int64)
    labels = np.asarray(part[spec.label_column], dtype=np.int64)
    return _decode_images(part, spec.image_column), labels, ids


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
        arrays = _local_arrays(name, data_dir)
        parts = _local_partitioners(name, data_dir, num_partitions, *options)
        num_train = len(arrays.train_labels)
        for split, images, labels, offset in (
            ("train", arrays.train_images, arrays.train_labels, 0),
            ("test", arrays.test_images, arrays.test_labels, num_train),
        ):
            ids = _load_partition_column(parts[split], partition_id, SAMPLE_ID)
            rows = ids - offset
            sets[split] = _to_sample_set(
                images[rows], labels[rows], ids, spec, augment=split == "train"
            )
    else:
        key = (name, num_partitions, *options)
        for split in ("train", "test"):
            sets[split] = _to_sample_set(
                *_hub_node_arrays(key, partition_id, split), spec, augment=split == "train"
            )
    return Partition(train=sets["train"], test=sets["test"], num_classes=spec.num_classes)


# -- public loaders --------------------------------------------------------------------
@lru_cache(maxsize=4)
def load_dataset(name: str, seed: int = 0, data_dir: str = "") -> tuple[SampleSet, int]:
    """The whole data set ``name`` and its number of classes.

    For the image data sets this is the training split (normalised), read from
    ``data_dir`` when set, else from the Hub; it raises
    :class:`DataUnavailableError` when neither works.
    """
    _check_name(name)
    if name in DATASETS:
        return DATASETS[name](seed)
    spec = IMAGE_DATASETS[name]
    if data_dir:
        arrays = _local_arrays(name, data_dir)
        images, labels = arrays.train_images, arrays.train_labels
    else:
        train = _federated_dataset(name, 1, "iid", 0.5, 2, 0, seed).load_split("train")
        train = train.sort(SAMPLE_ID)
        images = _decode_images(train, spec.image_column)
        labels = np.asarray(train[spec.label_column], dtype=np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    return _to_sample_set(images, labels, ids, spec), spec.num_classes


def describe_dataset(name: str, data_dir: str = "", seed: int = 0) -> DatasetInfo:
    """Class count and split sizes of ``name``, checking that it can be loaded.

    Reads a local copy when ``data_dir`` is set (no network access), else fetches
    the image data sets from the Hub (or the Hugging Face cache).

    Raises
    ------
    DataUnavailableError
        When an image data set is available neither locally nor from the Hub.
    ValueError
        When ``name`` is unknown.
    """
    _check_name(name)
    if name in DATASETS:
        full, num_classes = load_dataset(name, seed)
        return DatasetInfo(name, num_classes, len(full), 0, "in memory")
    spec = IMAGE_DATASETS[name]
    if data_dir:
        arrays = _local_arrays(name, data_dir)
        num_train, num_test = len(arrays.train_labels), len(arrays.test_labels)
        source = f"local copy in {data_dir}"
    else:
        fds = _federated_dataset(name, 1, "iid", 0.5, 2, 0, seed)
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
) -> tuple[np.ndarray, ...]:
    full, _ = load_dataset(dataset, seed)
    return tuple(
        partition_indices(
            full.labels.numpy(),
            num_partitions,
            partitioner,
            dirichlet_alpha,
            seed,
            classes_per_partition=classes_per_partition,
            min_partition_size=min_partition_size,
        )
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

    Returns
    -------
    Partition
        ``digits`` / ``synthetic``: the node's partition split 80/20 into train and
        test (seeded). Image data sets: the node's partition of the training split,
        its IID share of the test split, and the training augmentation.
    """
    _check_name(dataset)
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
    full, num_classes = load_dataset(dataset, seed)
    index = _all_partitions(
        dataset,
        num_partitions,
        partitioner,
        float(dirichlet_alpha),
        seed,
        int(classes_per_partition),
        int(min_partition_size),
    )[partition_id]
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


# -- the label-distribution plot -------------------------------------------------------
def _train_partitioner(
    dataset: str,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
    data_dir: str,
) -> tuple[Partitioner, str]:
    """The training split's partitioner with its data assigned, and its label column."""
    options = (
        partitioner,
        float(dirichlet_alpha),
        int(classes_per_partition),
        int(min_partition_size),
        seed,
    )
    if dataset in IMAGE_DATASETS:
        label_column = IMAGE_DATASETS[dataset].label_column
        if data_dir:
            parts = _local_partitioners(dataset, data_dir, num_partitions, *options)
            return parts["train"], label_column
        fds = _federated_dataset(dataset, num_partitions, *options)
        return fds.partitioners["train"], label_column
    full, _ = load_dataset(dataset, seed)
    part = _index_partitioner(
        full.labels.numpy(),
        num_partitions,
        partitioner,
        dirichlet_alpha,
        seed,
        classes_per_partition,
        min_partition_size,
    )
    return part, "label"


def plot_label_distribution(
    path: str | os.PathLike[str],
    dataset: str,
    num_partitions: int,
    partitioner: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 42,
    *,
    classes_per_partition: int = 2,
    min_partition_size: int = 10,
    data_dir: str = "",
) -> Path:
    """Write a plot of every partition's label counts (of the training data) to
    ``path``, with flwr-datasets' ``plot_label_distributions``; return the path.

    A bar chart for up to 20 classes, a heatmap beyond.
    """
    from datasets import ClassLabel
    from flwr_datasets.visualization import plot_label_distributions
    from matplotlib.figure import Figure

    _check_name(dataset)
    part, label_column = _train_partitioner(
        dataset,
        num_partitions,
        partitioner,
        dirichlet_alpha,
        classes_per_partition,
        min_partition_size,
        seed,
        data_dir,
    )
    num_classes = (
        IMAGE_DATASETS[dataset].num_classes
        if dataset in IMAGE_DATASETS
        else load_dataset(dataset, seed)[1]
    )
    title = f"{dataset}: {partitioner} partitions"
    if partitioner == "dirichlet":
        title += f" (alpha {dirichlet_alpha:g})"
    elif partitioner == "pathological":
        title += f" ({classes_per_partition} classes each)"
    few = num_classes <= 20
    # a Figure of its own, without pyplot: no global state, no display needed
    width = max(6.0, 0.4 * num_partitions + 3.0)
    figure = Figure(figsize=(width, 5.0 if few else 12.0))
    plot_label_distributions(
        part,
        label_name=label_column,
        plot_type="bar" if few else "heatmap",
        size_unit="absolute",
        axis=figure.add_subplot(),
        legend=few,
        title=title,
        verbose_labels=isinstance(part.dataset.features[label_column], ClassLabel),
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, bbox_inches="tight")
    return out


def clear_caches() -> None:
    """Forget the data sets and partitions this process has loaded."""
    for cached in (
        load_dataset,
        _all_partitions,
        _local_arrays,
        _local_partitioners,
        _federated_dataset,
        _hub_node_arrays,
    ):
        cached.cache_clear()
