"""The data sets that need no download: ``digits`` and ``synthetic``.

Both are built in memory; a sample's id is its index in the set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .samples import SampleSet

__all__ = ["DATASETS", "digits", "synthetic"]


def _normalise(images: Tensor) -> Tensor:
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (images - mean) / std


def digits(seed: int) -> tuple[SampleSet, int]:
    """scikit-learn's handwritten digits (1,797 8x8 images), upsampled to 32x32x3."""
    del seed  # a fixed, real data set
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    images = _normalise(images.repeat(1, 3, 1, 1)).contiguous()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    ids = torch.arange(len(labels), dtype=torch.long)
    return SampleSet(images, labels, ids), 10


def synthetic(seed: int, num_samples: int = 600, num_classes: int = 10) -> tuple[SampleSet, int]:
    """Seeded class-template images with noise, for tests."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, 8, 8, generator=gen)
    templates = F.interpolate(templates, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.arange(num_samples, dtype=torch.long) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    noise = 0.8 * torch.randn(num_samples, 3, 32, 32, generator=gen)
    images = _normalise(templates[labels] + noise).contiguous()
    return SampleSet(images, labels, torch.arange(num_samples, dtype=torch.long)), num_classes


DATASETS: dict[str, Callable[[int], tuple[SampleSet, int]]] = {
    "digits": digits,
    "synthetic": synthetic,
}
