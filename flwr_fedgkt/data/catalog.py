"""The paper's image data sets: where each comes from, how to read it, and the one
message that says it is not available."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CINIC10_CLASSES",
    "IMAGE_DATASETS",
    "DataUnavailableError",
    "ImageDatasetSpec",
    "unavailable",
]


class DataUnavailableError(RuntimeError):
    """A data set can be loaded neither from a local copy nor from the network.

    The message names the data set, what was tried and how to fix it.
    """


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
        local_folder=(
            "cifar-10-batches-py/ (data_batch_1 ... data_batch_5, test_batch, batches.meta)"
        ),
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
        local_folder="cifar-100-python/ (train, test, meta)",
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
"""CINIC-10's class folders; a class's label is its position here (alphabetical, as
torchvision's ``ImageFolder`` numbers them)."""


def unavailable(name: str, tried: list[str]) -> DataUnavailableError:
    """The error for image data set ``name``: one ``Tried:`` line per attempt, then
    how to fix it."""
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
