"""A node's data as the edge trainer reads it: ``(inputs, labels, sample ids)``
batches.

A node's data (:data:`EdgeData`) is a :class:`~flwr_fedgkt.data.SampleSet`
(images held as one tensor, augmented per batch) or any
``torch.utils.data.Dataset`` / sequence of ``(x, y)`` or ``(x, y, sample_id)``
items, or of dict items as flwr-datasets / Hugging Face partitions give them
(``{"img": ..., "label": ...}``): :class:`IdentifiedSamples` reads each item as
``(image, label, sample id)``, the item's index being its id when it carries none,
and turns PIL images and numpy arrays into tensors. Training reads the data in
shuffled batches, each augmented per sample without changing its order, so every
image keeps its sample id (:func:`training_batches`, shuffled by
:func:`edge_generator`); extraction reads it in its own order, a ``SampleSet``
never augmented. :func:`check_edge_data` puts a data set's first item through an
edge model, so that data or a model that cannot work is named before any round.

This module imports no Flower code (torchvision only to convert a PIL image).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import Augmentation, SampleSet

__all__ = [
    "EdgeData",
    "IdentifiedSamples",
    "ImageTransform",
    "readable_data",
    "check_edge_data",
    "shape_text",
    "edge_generator",
    "ordered_batches",
    "training_batches",
]


def edge_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """The shuffling RNG of one node's edge training in one round: different per
    node and round, reproducible for a given seed."""
    return torch.Generator().manual_seed(hash((seed, partition_id, server_round)) % 2**63)


EdgeData = SampleSet | Dataset[Any] | Sequence[Any]
"""A node's data: a :class:`~flwr_fedgkt.data.SampleSet`, or any data set or
sequence of ``(x, y)`` / ``(x, y, sample_id)`` items or of dict items
(flwr-datasets partitions)."""

ImageTransform = Callable[[Any], Any]
"""What turns one item's image into the edge model's input (a torchvision
transform, say)."""

IMAGE_FALLBACK = {"img": "image"}
"""The key read when an item has no image under the default ``image_key``."""


def shape_text(shape: Sequence[int]) -> str:
    """A shape as text, e.g. ``6x14x14`` (``scalar`` for ``()``)."""
    return "x".join(str(int(n)) for n in shape) or "scalar"


class IdentifiedSamples(Dataset[tuple[Any, Tensor, Tensor]]):
    """Any data set of ``(x, y)`` / ``(x, y, sample_id)`` items or of dict items
    (``{"img": image, "label": label}``, as flwr-datasets partitions give them) as
    ``(x, y, id)`` items: the id is the item's own when it has one, else its
    index.

    Parameters
    ----------
    data : Dataset | Sequence
        The items, read by index (``len(data)``, ``data[i]``), e.g. a
        ``datasets.Dataset``.
    image_key : str (default: "img")
        The key of a dict item's image; with the default, an item without ``img``
        has its image read from ``image``.
    label_key : str (default: "label")
        The key of a dict item's label.
    transform : ImageTransform | None (default: None)
        Applied to the image of every item (either form), e.g. a torchvision
        ``Compose([ToTensor(), Normalize(...)])``.

    Notes
    -----
    After ``transform``, a PIL image becomes a float tensor in [0, 1]
    (torchvision's ``to_tensor``), a numpy array a tensor (numpy's float64 as
    float32), and a dict item's nested lists a float32 tensor; other inputs are
    left as they are. Labels must be one integer each (a float label must be a
    whole number) and become ``int64`` scalars, as ids do. Anything else is a
    ValueError that names the item and what to pass.
    """

    def __init__(
        self,
        data: Dataset[Any] | Sequence[Any],
        *,
        image_key: str = "img",
        label_key: str = "label",
        transform: ImageTransform | None = None,
    ) -> None:
        self.data = data
        self.image_key = image_key
        self.label_key = label_key
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Tensor, Tensor]:
        item = self.data[index]
        if isinstance(item, Mapping):
            image, label = self._dict_parts(item, index)
            x = _as_image(self._transformed(image), lists=True)
            fix = f"pass label_key=... naming its integer label (now {self.label_key!r})"
            return x, _as_label(label, index, fix), _as_id(index)
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise ValueError(
                f"item {index} of the data set is a {type(item).__name__}; expected "
                "(x, y), (x, y, sample_id) or a dict with the image under "
                f"image_key={self.image_key!r} and the label under "
                f"label_key={self.label_key!r} (as flwr-datasets partitions give)"
            )
        sample_id = item[2] if len(item) == 3 else index
        x = _as_image(self._transformed(item[0]), lists=False)
        return x, _as_label(item[1], index), _as_id(sample_id)

    def _transformed(self, image: Any) -> Any:
        return image if self.transform is None else self.transform(image)

    def _dict_parts(self, item: Mapping[str, Any], index: int) -> tuple[Any, Any]:
        """A dict item's image and label; a ValueError naming the keys it has
        when either is missing."""
        image_key = self.image_key
        fallback = IMAGE_FALLBACK.get(image_key)
        if image_key not in item and fallback is not None and fallback in item:
            image_key = fallback
        missing = []
        if image_key not in item:
            nor = f" nor {fallback!r}" if fallback is not None else ""
            missing.append(f"its image (image_key={image_key!r}{nor})")
        if self.label_key not in item:
            missing.append(f"its label (label_key={self.label_key!r})")
        if missing:
            raise ValueError(
                f"item {index} of the data set is a dict with keys {sorted(map(str, item))}, "
                f"without {' or '.join(missing)}: pass image_key=... and label_key=... "
                "naming the keys of its image and its label"
            )
        return item[image_key], item[self.label_key]


def _as_image(x: Any, lists: bool) -> Any:
    """A PIL image or numpy array (with ``lists``, nested lists too) as a tensor;
    anything else as it is."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        tensor = torch.as_tensor(x)
        return tensor.float() if tensor.dtype == torch.float64 else tensor
    if _is_pil_image(x):
        from torchvision.transforms.functional import (  # pylint: disable=import-outside-toplevel
            to_tensor,
        )

        return to_tensor(x)
    if lists and isinstance(x, list | tuple):
        return torch.as_tensor(x, dtype=torch.float32)
    return x


def _is_pil_image(x: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # not loaded: x cannot be a PIL image
    return pil is not None and isinstance(x, pil.Image)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_label(value: Any, index: int, fix: str = "") -> Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        tensor = None
    if (
        tensor is None
        or tensor.numel() != 1
        or tensor.dtype == torch.bool
        or tensor.dtype.is_complex
        or (tensor.dtype.is_floating_point and not bool(tensor.isfinite().all()))
        or (tensor.dtype.is_floating_point and not bool((tensor == tensor.round()).all()))
    ):
        hint = f", or {fix}" if fix else ""
        raise ValueError(
            f"item {index} of the data set has the label {_short(value)}; a label "
            f"must be one integer class index (0, 1, ...): map the labels to class indices{hint}"
        )
    return tensor.reshape(()).to(torch.long)


def _as_id(value: Any) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"a sample id must be one integer, got {value!r}")
    return tensor.reshape(()).to(torch.long)


def readable_data(
    data: EdgeData,
    *,
    image_key: str = "img",
    label_key: str = "label",
    transform: ImageTransform | None = None,
) -> EdgeData:
    """``data`` as the edge trainer reads it: a ``SampleSet`` as it is, any other
    data set as :class:`IdentifiedSamples` with these keys and ``transform``.
    A ``SampleSet`` has no items to transform (its ``augmentation`` augments its
    batches): a ``transform`` with one is a ValueError."""
    if isinstance(data, SampleSet):
        if transform is not None:
            raise ValueError(
                "a SampleSet holds its images as one tensor and is not transformed "
                "item by item: give it an augmentation instead of transform=..., or "
                "pass the items as a data set"
            )
        return data
    if isinstance(data, IdentifiedSamples):
        return data
    return IdentifiedSamples(data, image_key=image_key, label_key=label_key, transform=transform)


def check_edge_data(model: nn.Module, data: EdgeData, name: str = "train_data") -> None:
    """Read ``data``'s first item (as :func:`readable_data` gives it) and put
    its image through ``model`` (eval mode, no gradient, a batch of one, on the
    model's device), so that data of a wrong form, a label that is not an integer,
    an image the model cannot take, or a model that does not return ``(logits,
    features)`` are named before any training. An empty data set is not checked.
    The global RNG is left as it was (a random ``transform`` draws from it);
    ``model`` is left in eval mode."""
    if len(data) == 0:  # type: ignore[arg-type]
        return
    with torch.random.fork_rng(devices=[]):
        try:
            if isinstance(data, SampleSet):
                image = data.images[0]
            else:
                samples = data if isinstance(data, IdentifiedSamples) else IdentifiedSamples(data)
                image = samples[0][0]
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        except Exception as err:  # pylint: disable=broad-exception-caught
            raise ValueError(
                f"{name}: reading item 0 (with its transform) failed: {type(err).__name__}: {err}"
            ) from err
        if not isinstance(image, Tensor):
            raise ValueError(
                f"{name}: item 0's image is a {type(image).__name__}, not a tensor: "
                "pass transform=... that turns an image into the tensor the edge model takes"
            )
        described = (
            f"shape {shape_text(image.shape)}, dtype {str(image.dtype).removeprefix('torch.')}"
        )
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model.eval()
        try:
            with torch.no_grad():
                out = model(image.unsqueeze(0).to(device))
        except Exception as err:  # pylint: disable=broad-exception-caught
            raise ValueError(
                f"the edge model cannot take {name}'s images ({described}, as a batch "
                f"of one): {type(err).__name__}: {err}. Pass transform=... that turns "
                "each image into the input the model takes, or change the model's "
                "input layer"
            ) from err
    _check_output(out)


def _check_output(out: Any) -> None:
    """The model's output on a batch of one must be ``(logits, features)``."""
    if isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(t, Tensor) for t in out):
        logits, features = out
        if logits.ndim == 2 and logits.shape[0] == 1 and features.shape[:1] == (1,):
            return
        got = f"tensors of shapes {shape_text(logits.shape)} and {shape_text(features.shape)}"
    elif isinstance(out, Tensor):
        got = f"one tensor of shape {shape_text(out.shape)}"
    else:
        got = f"a {type(out).__name__}"
    raise ValueError(
        f"the edge model's forward must return (logits, features), logits of shape "
        f"batch x classes and features batch x the feature shape; for a batch of one it "
        f"returned {got}. Return both, e.g. `return self.head(features), features`, or "
        "cut a whole model in two with flwr_fedgkt.cut_model"
    )


def _loader(
    data: EdgeData, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> DataLoader[Any]:
    dataset: Dataset[Any]
    if isinstance(data, SampleSet):
        dataset = TensorDataset(data.images, data.labels, data.ids)
    elif isinstance(data, IdentifiedSamples):
        dataset = data
    else:
        dataset = IdentifiedSamples(data)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def ordered_batches(data: EdgeData, batch_size: int) -> Iterator[tuple[Any, Tensor, Tensor]]:
    """``(inputs, labels, ids)`` batches of ``data`` in its order, never augmented
    (a ``SampleSet`` is sliced, without a DataLoader)."""
    if not isinstance(data, SampleSet):
        yield from _loader(data, batch_size, False, None)
        return
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        yield data.images[rows], data.labels[rows], data.ids[rows]


def training_batches(
    data: EdgeData,
    batch_size: int,
    generator: torch.Generator | None = None,
    augment: Augmentation | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One epoch of shuffled ``(inputs, labels, ids)`` batches, on the CPU.

    Every batch's inputs are augmented per sample with ``augment``, or else with
    ``data.augmentation`` when ``data`` is a :class:`SampleSet` that has one,
    drawing from ``generator``; labels and ids are left as they are, aligned with
    their inputs.
    """
    loader = _loader(data, batch_size, True, generator)
    if augment is None and isinstance(data, SampleSet):
        augment = data.augmentation
    for images, labels, ids in loader:
        if augment is not None:
            images = augment(images, generator)
        yield images, labels, ids
