"""The label-distribution plot: every partition's label counts of the training data,
drawn with flwr-datasets' ``plot_label_distributions`` on a matplotlib ``Figure`` of
its own (no pyplot, no display)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import hub
from .catalog import IMAGE_DATASETS
from .loaders import check_name, offline_size
from .local import local_partitioners
from .offline import offline_labels
from .partitions import index_partitioner

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

__all__ = ["PLOT_MAX_PARTITIONS", "plot_label_distribution"]

PLOT_MAX_PARTITIONS = 50
"""A plot shows the first this many partitions (a wider one is unreadable)."""


def _train_partitioner(
    dataset: str,
    num_partitions: int,
    partitioner: str,
    dirichlet_alpha: float,
    classes_per_partition: int,
    min_partition_size: int,
    seed: int,
    data_dir: str,
    samples_per_node: int,
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
            parts = local_partitioners(dataset, data_dir, num_partitions, *options)
            return parts["train"], label_column
        fds = hub.federated_dataset(dataset, num_partitions, *options)
        return fds.partitioners["train"], label_column
    labels, _ = offline_labels(
        dataset, seed, offline_size(dataset, num_partitions, samples_per_node)
    )
    part = index_partitioner(
        labels,
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
    synthetic_samples_per_node: int = 0,
) -> Path:
    """Write a plot of every partition's label counts (of the training data) to
    ``path``, with flwr-datasets' ``plot_label_distributions``; return the path.

    A bar chart for up to 20 classes, a heatmap beyond; the first
    :data:`PLOT_MAX_PARTITIONS` partitions of a larger federation.
    """
    from datasets import ClassLabel
    from flwr_datasets.visualization import plot_label_distributions
    from matplotlib.figure import Figure

    check_name(dataset)
    part, label_column = _train_partitioner(
        dataset,
        num_partitions,
        partitioner,
        dirichlet_alpha,
        classes_per_partition,
        min_partition_size,
        seed,
        data_dir,
        synthetic_samples_per_node,
    )
    num_classes = (
        IMAGE_DATASETS[dataset].num_classes
        if dataset in IMAGE_DATASETS
        else offline_labels(
            dataset, seed, offline_size(dataset, num_partitions, synthetic_samples_per_node)
        )[1]
    )
    shown = min(num_partitions, PLOT_MAX_PARTITIONS)
    title = f"{dataset}: {partitioner} partitions"
    if shown < num_partitions:
        title = f"{dataset}: the first {shown} of {num_partitions} {partitioner} partitions"
    if partitioner == "dirichlet":
        title += f" (alpha {dirichlet_alpha:g})"
    elif partitioner == "pathological":
        title += f" ({classes_per_partition} classes each)"
    few = num_classes <= 20
    # a Figure of its own, without pyplot: no global state, no display needed
    width = max(6.0, 0.4 * shown + 3.0)
    figure = Figure(figsize=(width, 5.0 if few else 12.0))
    plot_label_distributions(
        part,
        label_name=label_column,
        plot_type="bar" if few else "heatmap",
        size_unit="absolute",
        max_num_partitions=shown,
        axis=figure.add_subplot(),
        legend=few,
        title=title,
        verbose_labels=isinstance(part.dataset.features[label_column], ClassLabel),
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, bbox_inches="tight")
    return out
