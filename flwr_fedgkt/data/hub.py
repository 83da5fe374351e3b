"""The image data sets from the Hugging Face Hub, through flwr-datasets'
``FederatedDataset`` (or from the Hugging Face cache with ``HF_HUB_OFFLINE=1``).

Before anything is downloaded the Hub is probed (:func:`reachable`), so that a
machine without network stops at once with the data set's ``Tried:`` / ``Fix:``
message instead of waiting on retries. flwr-datasets is imported where it is used:
it is a data library, not the Flower runtime.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import IMAGE_DATASETS, DataUnavailableError, unavailable
from .partitions import SAMPLE_ID, split_partitioners, with_sample_ids

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset

__all__ = [
    "HUB_PROBE_TIMEOUT",
    "decode_images",
    "endpoint",
    "federated_dataset",
    "hub_error",
    "node_arrays",
    "offline",
    "reachable",
]

HUB_PROBE_TIMEOUT = 5.0


def endpoint() -> str:
    """The Hub's address (``HF_ENDPOINT``, by default https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set: the Hugging Face cache only, no probe."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """``None`` when the Hub answers within ``timeout`` seconds, else the reason."""
    request = urllib.request.Request(endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return str(reason)


def hub_error(name: str, reason: str) -> DataUnavailableError:
    """The error for ``name`` when no ``data_dir`` is set and the Hub failed."""
    spec = IMAGE_DATASETS[name]
    hint = (
        "" if offline() else "; a copy in the Hugging Face cache is used only with HF_HUB_OFFLINE=1"
    )
    return unavailable(
        name,
        [
            "no data-dir set",
            f"the Hugging Face Hub ({spec.hub_id!r} through flwr-datasets' "
            f"FederatedDataset): {reason}{hint}",
        ],
    )


@lru_cache(maxsize=2)
def federated_dataset(
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
    if not offline():
        reason = reachable()
        if reason is not None:
            raise hub_error(name, f"{endpoint()} is unreachable ({reason})")
    fds = FederatedDataset(
        dataset=spec.hub_id,
        partitioners=split_partitioners(
            partitioner,
            num_partitions,
            spec.label_column,
            dirichlet_alpha,
            classes_per_partition,
            min_partition_size,
            seed,
        ),
        preprocessor=with_sample_ids(seed),
        shuffle=False,  # the preprocessor shuffles, after numbering the samples
    )
    try:
        fds.load_split("train")
    except Exception as err:  # any failure to fetch means: not available
        summary = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise hub_error(name, f"{type(err).__name__}: {summary}") from None
    return fds


def decode_images(split: Dataset, column: str) -> np.ndarray:
    from datasets import Image

    if column not in split.column_names:  # fall back on the split's image column
        column = next(c for c, f in split.features.items() if isinstance(f, Image))
    images = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in split[column]]
    if not images:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    return np.stack(images)


@lru_cache(maxsize=16)
def node_arrays(
    key: tuple[Any, ...], partition_id: int, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and sample ids of one node's share of ``split``; ``key`` holds
    :func:`federated_dataset`'s arguments."""
    spec = IMAGE_DATASETS[key[0]]
    part = federated_dataset(*key).load_partition(partition_id, split)
    ids = np.asarray(part[SAMPLE_ID], dtype=np.int64)
    labels = np.asarray(part[spec.label_column], dtype=np.int64)
    return decode_images(part, spec.image_column), labels, ids
