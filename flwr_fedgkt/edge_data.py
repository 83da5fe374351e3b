"""A node's data as the edge trainer reads it: ``(inputs, labels, sample ids)``
batches.

A node's data (:data:`EdgeData`) is a :class:`~flwr_fedgkt.data.SampleSet`
(images held as one tensor, augmented per batch) or any
``torch.utils.data.Dataset`` / sequence of ``(x, y)`` or ``(x, y, sample_id)``
items (the item's index is its sample id when it has none,
:class:`IdentifiedSamples`). Training reads it in shuffled batches, each
augmented per sample without changing its order, so every image keeps its sample
id (:func:`training_batches`, shuffled by :func:`edge_generator`); extraction
reads it in its own order, a ``SampleSet`` never augmented.

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import Augmentation, SampleSet

__all__ = [
    "EdgeData",
    "IdentifiedSamples",
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
sequence of ``(x, y)`` / ``(x, y, sample_id)`` items."""


class IdentifiedSamples(Dataset[tuple[Any, Tensor, Tensor]]):
    """Any data set of ``(x, y)`` or ``(x, y, sample_id)`` items as ``(x, y, id)``
    items: the id is the item's own when it has one, else its index.

    Labels and ids become ``int64`` scalars. Anything else is a ValueError that
    names the item.
    """

    def __init__(self, data: Dataset[Any] | Sequence[Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Tensor, Tensor]:
        item = self.data[index]
        if not isinstance(item, tuple | list) or len(item) not in (2, 3):
            raise ValueError(
                f"item {index} of the data set is a {type(item).__name__}; expected "
                "(x, y) or (x, y, sample_id)"
            )
        sample_id = item[2] if len(item) == 3 else index
        return item[0], torch.as_tensor(item[1], dtype=torch.long), _as_id(sample_id)


def _as_id(value: Any) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"a sample id must be one integer, got {value!r}")
    return tensor.reshape(()).to(torch.long)


def _loader(
    data: EdgeData, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> DataLoader[Any]:
    dataset: Dataset[Any]
    if isinstance(data, SampleSet):
        dataset = TensorDataset(data.images, data.labels, data.ids)
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
