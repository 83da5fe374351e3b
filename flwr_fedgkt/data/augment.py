"""The training augmentation of the image data sets: torchvision's
``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()``, drawn per image.

torchvision's transforms draw from torch's global random number generator. To
keep a run reproducible, every batch draws one seed from the round's seeded
``torch.Generator``; the images of the batch are then augmented one by one, in
batch order, on a fork of the global generator seeded with it
(``torch.random.fork_rng``), so the global generator is left as it was. The
augmentation changes pixels only: batch size and order stay, and so does every
image's sample id and KD target.

The random stream differs from the implementation before this module used
torchvision (which drew crop offsets and flips straight from the generator): a
seeded run still repeats exactly, but a CIFAR or CINIC-10 run augments differently
than it did then. ``digits`` and ``synthetic`` are not augmented.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["RandomCropFlip"]

_GLOBAL_RNG = threading.Lock()
"""Held while a batch is augmented on the forked global generator, so that two
threads augmenting at once do not draw from each other's seed."""


class RandomCropFlip:
    """The training augmentation: random crop with padding, then a horizontal flip,
    drawn per image (the reference code also applies Cutout(16); this project does
    not).

    Each image is padded by ``padding`` pixels of black and cropped back to its size
    at a random offset, then flipped horizontally with probability
    ``flip_probability``: torchvision's ``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``. It works on *normalised* batches (``B x C x H x W``):
    the padding takes the normalised value of black, ``-mean / std``, so the result
    equals augmenting the raw image and normalising it afterwards. Every image of a
    batch gets its own crop offset and flip. With a ``generator``, the draws are
    seeded from it (see the module docstring), so a seeded run is reproducible;
    without one, they come from torch's global generator.

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
        self._transforms: dict[tuple[int, int], Callable[[Tensor], Any]] = {}

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip_probability={self.flip_probability})"

    def transform(self, height: int, width: int) -> Callable[[Tensor], Any]:
        """The torchvision transform of one ``C x height x width`` image."""
        key = (height, width)
        if key not in self._transforms:
            from torchvision.transforms import v2

            self._transforms[key] = v2.Compose(
                [
                    v2.RandomCrop((height, width), padding=self.padding, fill=self.fill),
                    v2.RandomHorizontalFlip(p=self.flip_probability),
                ]
            )
        return self._transforms[key]

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch; sample order (and so the sample ids) is unchanged."""
        if images.shape[0] == 0:
            return images.clone()
        transform = self.transform(*images.shape[-2:])
        if generator is None:
            return torch.stack([transform(image) for image in images])
        seed = int(torch.randint(0, 2**63 - 1, (), generator=generator))
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed CUDA's
            torch.default_generator.manual_seed(seed)
            return torch.stack([transform(image) for image in images])
