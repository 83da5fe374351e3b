"""The image data sets from local copies (torchvision's CIFAR pickles, CINIC-10's
image folders) and through FederatedDataset, on tiny files written here."""

import dataclasses
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvf
from PIL import Image

from flwr_fedgkt import data
from flwr_fedgkt.data import (
    CINIC10_CLASSES,
    IMAGE_DATASETS,
    RandomCropFlip,
    describe_dataset,
    load_dataset,
    load_partition,
    plot_label_distribution,
)
from flwr_fedgkt.data import hub as hub_source
from flwr_fedgkt.edge import EdgeTrainer
from flwr_fedgkt.models import build_model

pytestmark = pytest.mark.usefixtures("fresh_data_caches")


def _marked_images(first_id: int, n: int) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 images whose top-left pixel encodes their id."""
    rng = np.random.default_rng(first_id)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    ids = np.arange(first_id, first_id + n)
    images[:, 0, 0, 0] = ids % 256
    images[:, 0, 0, 1] = ids // 256
    return images


def _pickle(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    # the archive's format: N x 3072 uint8 rows (channel-major), labels as a list
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    with open(path, "wb") as handle:
        pickle.dump({"data": rows, label_key: labels.tolist()}, handle, protocol=2)


def write_cifar10(root: Path, per_batch: int = 12, num_test: int = 10) -> np.ndarray:
    """A tiny ``cifar-10-batches-py``; returns every label, train then test."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    labels = np.arange(5 * per_batch + num_test) % 10
    for i in range(5):
        start = i * per_batch
        _pickle(
            folder / f"data_batch_{i + 1}",
            _marked_images(start, per_batch),
            labels[start : start + per_batch],
            "labels",
        )
    num_train = 5 * per_batch
    _pickle(
        folder / "test_batch", _marked_images(num_train, num_test), labels[num_train:], "labels"
    )
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(CINIC10_CLASSES)}, handle, protocol=2)
    return labels


def write_cifar100(root: Path, num_train: int = 200, num_test: int = 100) -> np.ndarray:
    """A tiny ``cifar-100-python``; returns every fine label, train then test."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = np.arange(num_train + num_test) % 100
    _pickle(folder / "train", _marked_images(0, num_train), labels[:num_train], "fine_labels")
    _pickle(folder / "test", _marked_images(num_train, num_test), labels[num_train:], "fine_labels")
    with open(folder / "meta", "wb") as handle:
        names = [f"class_{i}" for i in range(100)]
        pickle.dump({"fine_label_names": names, "coarse_label_names": names[:20]}, handle, 2)
    return labels


def fake_checksums(folder: Path) -> dict[str, str]:
    """The MD5 checksum of every file of a fake CIFAR copy, by file name."""
    return {path.name: hashlib.md5(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def accept_fake_copy(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Let torchvision's integrity check pass a fake CIFAR copy.

    torchvision checks a copy against the MD5 checksums of the published archive,
    which no fake copy can match. The check stays on; the checksums it expects become
    those of the files in ``folder`` (any other content is still rejected). One copy
    per kind at a time: call this again before the first load of another copy.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    sums = fake_checksums(folder)
    dataset = CIFAR10 if (folder / "batches.meta").exists() else CIFAR100
    for attribute in ("train_list", "test_list"):
        files = [[name, sums[name]] for name, _ in getattr(dataset, attribute)]
        monkeypatch.setattr(dataset, attribute, files)
    monkeypatch.setattr(dataset, "meta", {**dataset.meta, "md5": sums[dataset.meta["filename"]]})


def write_cinic10(root: Path, per_class: dict[str, int]) -> None:
    """CINIC-10's layout: <split>/<class>/*.png, every image filled with its class."""
    for split, n in per_class.items():
        for label, name in enumerate(CINIC10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((32, 32, 3), 20 * label + i, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"cifar10-{split}-{i}.png")


def _raw_pixels(images: torch.Tensor, name: str) -> np.ndarray:
    """Undo the normalisation: uint8 N x 3 x 32 x 32."""
    spec = IMAGE_DATASETS[name]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8).numpy()


def _decoded_ids(images: torch.Tensor, name: str) -> np.ndarray:
    raw = _raw_pixels(images, name).astype(np.int64)
    return raw[:, 0, 0, 0] + 256 * raw[:, 1, 0, 0]


@pytest.mark.parametrize("point_at", ["parent", "batches-folder", "renamed-batches-folder"])
def test_cifar10_folder_loads_with_stable_ids_and_a_test_split(
    tmp_path, monkeypatch, point_at
) -> None:
    # Prepare
    labels = write_cifar10(tmp_path)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    if point_at == "renamed-batches-folder":
        data_dir = data_dir.rename(tmp_path / "cifar10")
    num_train = 60
    # Execute
    parts = [
        load_partition("cifar10", i, 3, "iid", seed=1, data_dir=str(data_dir)) for i in range(3)
    ]
    # Assert
    train_ids = np.concatenate([p.train.ids.numpy() for p in parts])
    test_ids = np.concatenate([p.test.ids.numpy() for p in parts])
    assert sorted(train_ids.tolist()) == list(range(num_train))
    assert sorted(test_ids.tolist()) == list(range(num_train, num_train + 10))
    for part in parts:
        assert part.num_classes == 10
        for split in (part.train, part.test):
            assert split.images.shape[1:] == (3, 32, 32) and split.images.dtype == torch.float32
            # every image is the one its id names, with that id's label
            assert np.array_equal(_decoded_ids(split.images, "cifar10"), split.ids.numpy())
            assert np.array_equal(split.labels.numpy(), labels[split.ids.numpy()])
        assert isinstance(part.train.augmentation, RandomCropFlip)
        assert part.test.augmentation is None
    info = describe_dataset("cifar10", str(data_dir))
    assert (info.num_classes, info.num_train, info.num_test) == (10, num_train, 10)
    assert info.summary().startswith("cifar10: 10 classes, 60 training / 10 test images (local")


def test_cifar10_is_normalised_with_its_channel_statistics(tmp_path, monkeypatch) -> None:
    # Prepare
    write_cifar10(tmp_path)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-10-batches-py")
    # Execute
    full, num_classes = load_dataset("cifar10", data_dir=str(tmp_path))
    # Assert
    raw = _raw_pixels(full.images, "cifar10")
    expected = _marked_images(0, 12)  # data_batch_1
    assert num_classes == 10 and len(full) == 60
    assert np.array_equal(raw[:12], expected.transpose(0, 3, 1, 2))
    assert torch.equal(full.ids, torch.arange(60))
    spec = IMAGE_DATASETS["cifar10"]
    as_tensors = tvf.to_dtype(torch.from_numpy(expected).permute(0, 3, 1, 2), scale=True)
    torch.testing.assert_close(
        full.images[:12], tvf.normalize(as_tensors, list(spec.mean), list(spec.std))
    )


def test_partitions_of_a_local_copy_are_reproducible(tmp_path, monkeypatch) -> None:
    # Prepare
    write_cifar10(tmp_path, per_batch=40)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-10-batches-py")
    kwargs = {"dirichlet_alpha": 0.5, "min_partition_size": 0, "data_dir": str(tmp_path)}
    # Execute
    first = [load_partition("cifar10", i, 3, "dirichlet", seed=5, **kwargs) for i in range(3)]
    data.clear_caches()
    again = [load_partition("cifar10", i, 3, "dirichlet", seed=5, **kwargs) for i in range(3)]
    # Assert
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.train.ids, b.train.ids) and torch.equal(a.test.ids, b.test.ids)
        assert torch.equal(a.train.images, b.train.images)


def test_cifar100_folder_gives_a_hundred_classes_and_hundred_class_heads(
    tmp_path, monkeypatch
) -> None:
    # Prepare
    labels = write_cifar100(tmp_path)
    accept_fake_copy(monkeypatch, tmp_path / "cifar-100-python")
    # Execute
    info = describe_dataset("cifar100", str(tmp_path))
    part = load_partition("cifar100", 1, 2, "iid", seed=0, data_dir=str(tmp_path))
    edge = EdgeTrainer(part.num_classes, device="cpu", seed=0)
    server = build_model("resnet109", info.num_classes)
    # Assert
    assert (info.num_classes, info.num_train, info.num_test) == (100, 200, 100)
    assert part.num_classes == 100 and len(part.train) == 100 and len(part.test) == 50
    assert np.array_equal(part.train.labels.numpy(), labels[part.train.ids.numpy()])
    assert set(part.test.ids.tolist()) <= set(range(200, 300))
    extracted = edge.extract(part.test)
    assert extracted.logits.shape == (50, 100)
    assert server(extracted.features[:2]).shape == (2, 100)


def test_cinic10_image_folders_load_by_class_folder(tmp_path) -> None:
    # Prepare
    write_cinic10(tmp_path, {"train": 3, "valid": 1, "test": 2})
    # Execute
    parts = [
        load_partition("cinic10", i, 2, "iid", seed=0, data_dir=str(tmp_path)) for i in range(2)
    ]
    # Assert
    train = torch.cat([p.train.ids for p in parts])
    test = torch.cat([p.test.ids for p in parts])
    assert sorted(train.tolist()) == list(range(30))  # valid/ is not used
    assert sorted(test.tolist()) == list(range(30, 50))
    for part in parts:
        for split in (part.train, part.test):
            raw = _raw_pixels(split.images, "cinic10")[:, 0, 0, 0].astype(np.int64)
            # each image was filled with 20 * label + its index in the class folder
            assert np.array_equal(raw // 20, split.labels.numpy())
    info = describe_dataset("cinic10", str(tmp_path))
    assert (info.num_train, info.num_test) == (30, 20)


def test_hub_copy_through_federated_dataset_matches_the_local_copy(tmp_path, monkeypatch) -> None:
    # Prepare: the same tiny CIFAR-10 as pickles and as a Hub-style parquet repository
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    labels = write_cifar10(tmp_path / "local", per_batch=20)
    accept_fake_copy(monkeypatch, tmp_path / "local" / "cifar-10-batches-py")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    features = Features({"img": ImageFeature(), "label": ClassLabel(names=list(CINIC10_CLASSES))})
    train_images = np.concatenate([_marked_images(20 * i, 20) for i in range(5)])
    for split, first, arrays in (
        ("train", 0, train_images),
        ("test", 100, _marked_images(100, 10)),
    ):
        images = [Image.fromarray(a) for a in arrays]
        table = {"img": images, "label": labels[first : first + len(arrays)].tolist()}
        Dataset.from_dict(table, features=features).to_parquet(str(hub / f"{split}-0.parquet"))
    spec = dataclasses.replace(IMAGE_DATASETS["cifar10"], hub_id=str(tmp_path / "hub"))
    monkeypatch.setitem(IMAGE_DATASETS, "cifar10", spec)
    monkeypatch.setattr(hub_source, "reachable", lambda timeout=0.0: None)
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    options = {"dirichlet_alpha": 0.5, "min_partition_size": 0, "seed": 3}
    # Execute
    from_hub = [load_partition("cifar10", i, 2, "dirichlet", **options) for i in range(2)]
    from_disk = [
        load_partition("cifar10", i, 2, "dirichlet", data_dir=str(tmp_path / "local"), **options)
        for i in range(2)
    ]
    # Assert
    for hub_part, disk_part in zip(from_hub, from_disk, strict=True):
        for a, b in ((hub_part.train, disk_part.train), (hub_part.test, disk_part.test)):
            assert torch.equal(a.ids, b.ids)
            assert torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)
    assert describe_dataset("cifar10").num_train == 100


def test_label_distribution_plot_is_written(tmp_path, monkeypatch) -> None:
    # Prepare
    write_cifar10(tmp_path / "c10", per_batch=40)
    accept_fake_copy(monkeypatch, tmp_path / "c10" / "cifar-10-batches-py")
    out = tmp_path / "out" / "labels.png"
    # Execute
    path = plot_label_distribution(
        out,
        "cifar10",
        4,
        "dirichlet",
        0.3,
        seed=1,
        min_partition_size=0,
        data_dir=str(tmp_path / "c10"),
    )
    # Assert
    assert path == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
