"""Local copies of the image data sets, read with torchvision and no network access.

* CIFAR-10 / CIFAR-100: torchvision's ``datasets.CIFAR10`` / ``CIFAR100`` with
  ``download=False``, which check every file against the MD5 checksum of the
  published archive before reading it. ``data_dir`` may be the folder that holds
  ``cifar-10-batches-py/`` (``cifar-100-python/``) or that folder itself.
* CINIC-10: torchvision's ``datasets.ImageFolder`` over ``train/<class>/*.png`` and
  ``test/<class>/*.png`` (``valid/`` is not used); the ten class folders are
  required, and a class's label is its position in :data:`CINIC10_CLASSES`.

Whatever is wrong with a copy surfaces as :class:`DataUnavailableError` with the
data set's ``Tried:`` / ``Fix:`` message. A copy's partitions are computed on a
(sample id, label) table with the steps ``FederatedDataset`` takes for the Hub's
copy, so the same labels in the same order give the same partitions.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import CINIC10_CLASSES, IMAGE_DATASETS, unavailable
from .partitions import split_partitioners, with_sample_ids

if TYPE_CHECKING:
    from datasets import DatasetDict
    from flwr_datasets.partitioner import Partitioner

__all__ = ["ImageArrays", "local_arrays", "local_partitioners"]


@dataclass(frozen=True)
class ImageArrays:
    """A data set's splits as stored: uint8 images, N x 32 x 32 x 3 (HWC)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None


def _cifar_arrays(split: Any) -> tuple[np.ndarray, np.ndarray]:
    """A torchvision CIFAR split's uint8 HWC images and labels."""
    images = np.ascontiguousarray(np.asarray(split.data, dtype=np.uint8))
    labels = np.asarray(split.targets, dtype=np.int64)
    if images.shape[1:] != (32, 32, 3) or len(labels) != len(images):
        raise ValueError(
            f"{len(images)} images of shape {images.shape[1:]} and {len(labels)} labels; "
            "expected as many labels as 32 x 32 x 3 images"
        )
    return images, labels


def _read_cifar(root: Path, layout: str) -> ImageArrays:
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import check_integrity

    dataset: Any = CIFAR10 if layout == "cifar10" else CIFAR100
    base = root / dataset.base_folder if (root / dataset.base_folder).is_dir() else root
    if base.name != dataset.base_folder:  # data-dir holds the files, under another name
        dataset = type(dataset.__name__, (dataset,), {"base_folder": base.name})
    expected = [*dataset.train_list, *dataset.test_list]
    expected.append([dataset.meta["filename"], dataset.meta["md5"]])
    missing = [name for name, _ in expected if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{base} lacks {', '.join(missing)}")
    try:
        train = dataset(str(base.parent), train=True, download=False)
        test = dataset(str(base.parent), train=False, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        damaged = [name for name, md5 in expected if not check_integrity(str(base / name), md5)]
        if not damaged:
            raise ValueError(f"{base}: {err}") from None
        files = f"the files {', '.join(damaged)}" if len(damaged) > 1 else f"the file {damaged[0]}"
        verb = "do" if len(damaged) > 1 else "does"
        raise ValueError(
            f"{files} in {base} {verb} not match the MD5 checksums of the published "
            "archive (a damaged or different copy)"
        ) from None
    train_images, train_labels = _cifar_arrays(train)
    test_images, test_labels = _cifar_arrays(test)
    classes = tuple(str(name) for name in train.classes) or None
    return ImageArrays(train_images, train_labels, test_images, test_labels, classes)


def _read_png_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import ImageFolder

    class Cinic10Split(ImageFolder):
        """CINIC-10's ten class folders, in this order; other folders are ignored."""

        def find_classes(self, directory: Any) -> tuple[list[str], dict[str, int]]:
            missing = [c for c in CINIC10_CLASSES if not (Path(directory) / c).is_dir()]
            if missing:
                raise FileNotFoundError(f"{directory} lacks the class folders {', '.join(missing)}")
            return list(CINIC10_CLASSES), {c: i for i, c in enumerate(CINIC10_CLASSES)}

    split = Cinic10Split(
        str(folder), is_valid_file=lambda path: path.endswith(".png"), allow_empty=True
    )
    if not split.samples:
        raise FileNotFoundError(f"{folder} holds no PNG images")
    images = []
    for index, (path, _) in enumerate(split.samples):
        array = np.asarray(split[index][0], dtype=np.uint8)  # decoded as RGB
        if array.shape != (32, 32, 3):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, expected 32x32")
        images.append(array)
    return np.stack(images), np.asarray(split.targets, dtype=np.int64)


def _read_image_folder(root: Path) -> ImageArrays:
    for candidate in (root, root / "CINIC-10", root / "cinic-10"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            root = candidate
            break
    else:
        raise FileNotFoundError(f"{root} has no train/ and test/ folders")
    train_images, train_labels = _read_png_split(root / "train")
    test_images, test_labels = _read_png_split(root / "test")
    return ImageArrays(train_images, train_labels, test_images, test_labels, CINIC10_CLASSES)


@lru_cache(maxsize=2)
def local_arrays(name: str, data_dir: str) -> ImageArrays:
    """Image data set ``name`` from the local copy in ``data_dir``.

    Raises
    ------
    DataUnavailableError
        When the copy is missing, incomplete, damaged or holds other labels.
    """
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
        raise unavailable(
            name, [f"data-dir {str(root)!r}, expecting {spec.local_folder}: {reason}"]
        ) from None
    for split, labels in (("train", arrays.train_labels), ("test", arrays.test_labels)):
        if labels.size and not 0 <= labels.min() <= labels.max() < spec.num_classes:
            raise unavailable(
                name,
                [
                    f"data-dir {str(root)!r}: {split} labels lie outside "
                    f"0..{spec.num_classes - 1}; is this a copy of {spec.title}?"
                ],
            )
    return arrays


def _label_splits(arrays: ImageArrays, label_column: str) -> DatasetDict:
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
def local_partitioners(
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
    splits = with_sample_ids(seed)(_label_splits(local_arrays(name, data_dir), spec.label_column))
    parts = split_partitioners(
        partitioner,
        num_partitions,
        spec.label_column,
        dirichlet_alpha,
        classes_per_partition,
        min_partition_size,
        seed,
    )
    for split, part in parts.items():
        part.dataset = splits[split]
    return parts
