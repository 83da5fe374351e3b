"""The data sets that need no download: ``digits`` and ``synthetic``.

Both are built in memory; a sample's id is its index in the set. ``synthetic``
has :data:`SYNTHETIC_SAMPLES` samples unless asked for another size (the run
config's ``synthetic-samples-per-node`` times the number of partitions), and its
labels can be had without its images (:func:`offline_labels`), for a server that
partitions or plots without holding the images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .samples import SampleSet

__all__ = ["DATASETS", "SYNTHETIC_SAMPLES", "digits", "synthetic", "offline_labels"]

SYNTHETIC_SAMPLES = 600
"""The size of ``synthetic`` when no size is asked for."""


def _normalise(images: Tensor) -> Tensor:
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std


def digits(seed: int, num_samples: int = 0) -> tuple[SampleSet, int]:
    """scikit-learn's handwritten digits (1,797 8x8 images), upsampled to 32x32x3.
    A fixed, real data set: ``seed`` is not used, and ``num_samples`` must be 0."""
    _fixed_size("digits", num_samples)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    images = _normalise(images.repeat(1, 3, 1, 1)).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    ids = torch.arange(len(labels), dtype=torch.long)
    return SampleSet(images, labels, ids), 10


def _fixed_size(name: str, num_samples: int) -> None:
    if num_samples:
        raise ValueError(f"{name} has a fixed size; num_samples must be 0, not {num_samples}")


def _synthetic_start(
    seed: int, num_samples: int, num_classes: int
) -> tuple[torch.Generator, Tensor, Tensor]:
    """The generator, the class templates and the labels of ``synthetic``; the
    noise is drawn from the generator after these."""
    if num_samples < 1:
        raise ValueError(f"synthetic needs at least one sample, not {num_samples}")
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 8, 8, generator=gen)
    labels = torch.arange(num_samples, dtype=torch.long) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    return gen, templates, labels


def synthetic(seed: int, num_samples: int = 0, num_classes: int = 10) -> tuple[SampleSet, int]:
    """Seeded class-template images with noise, for tests and scale runs:
    ``num_samples`` of them (0: :data:`SYNTHETIC_SAMPLES`), classes in equal
    shares."""
    num_samples = num_samples or SYNTHETIC_SAMPLES
    gen, templates, labels = _synthetic_start(seed, num_samples, num_classes)
    templates = F.interpolate(templates, size=(32, 32), mode="bilinear", align_corners=False)
    noise = 0.8 * torch.randn(num_samples, 3, 32, 32, generator=gen)
    images = _normalise(templates[labels] + noise).contiguous()
    return SampleSet(images, labels, torch.arange(num_samples, dtype=torch.long)), num_classes


def offline_labels(name: str, seed: int, num_samples: int = 0) -> tuple[np.ndarray, int]:
    """The labels of ``digits`` or ``synthetic`` (as :data:`DATASETS` builds it
    with the same arguments) and the class count, without building the images."""
    if name == "synthetic":
        _, _, labels = _synthetic_start(seed, num_samples or SYNTHETIC_SAMPLES, 10)
        return labels.numpy(), 10
    if name == "digits":
        _fixed_size(name, num_samples)
        from sklearn.datasets import load_digits

        return np.asarray(load_digits().target, dtype=np.int64), 10
    raise ValueError(f"{name!r} is not an in-memory data set")


DATASETS: dict[str, Callable[[int, int], tuple[SampleSet, int]]] = {
    "digits": digits,
    "synthetic": synthetic,
}
