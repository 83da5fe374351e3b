"""A node's data in the built-in app: its partition of the run's data set, as
every node and the server split it.

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .data import Partition, check_partitions, load_partition
from .settings import RunConfig

__all__ = ["partition_ids", "load_node_partition", "partition_sample_ids", "check_node_data"]


def partition_ids(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a node's config; a ValueError that
    says how to start the node when either is missing."""
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
    return partition_id, num_partitions


def _split_options(config: RunConfig) -> dict[str, Any]:
    """How the run config splits its data set: the keyword arguments that
    :func:`~flwr_fedgkt.data.load_partition` and
    :func:`~flwr_fedgkt.data.check_partitions` share."""
    return {
        "partitioner": config.partitioner,
        "dirichlet_alpha": config.dirichlet_alpha,
        "seed": config.seed,
        "classes_per_partition": config.classes_per_partition,
        "min_partition_size": config.min_partition_size,
        "data_dir": config.data_dir,
        "synthetic_samples_per_node": config.synthetic_samples_per_node,
    }


def load_node_partition(partition_id: int, num_partitions: int, config: RunConfig) -> Partition:
    """Partition ``partition_id`` of ``num_partitions`` of the run's data set, as the
    run config partitions it."""
    return load_partition(config.dataset, partition_id, num_partitions, **_split_options(config))


def partition_sample_ids(
    config: RunConfig, num_partitions: int
) -> Callable[[str, str], np.ndarray | None]:
    """The sample ids of each node key's partition, by split, as the server checks
    uploads against them: the built-in nodes' key is their ``partition-id``, and
    the server partitions the run's data set into ``num_partitions`` exactly as
    they do (loaded once per partition, on first use). None for a key that is no
    partition id below ``num_partitions``."""
    cache: dict[int, dict[str, np.ndarray]] = {}

    def sample_ids(key: str, split: str) -> np.ndarray | None:
        if not key.isdigit() or str(int(key)) != key or int(key) >= num_partitions:
            return None
        partition_id = int(key)
        if partition_id not in cache:
            partition = load_node_partition(partition_id, num_partitions, config)
            cache[partition_id] = {
                "train": partition.train.ids.numpy().copy(),
                "test": partition.test.ids.numpy().copy(),
            }
        return cache[partition_id].get(split)

    return sample_ids


def check_node_data(config: RunConfig, num_nodes: int) -> str:
    """Check, before a run starts, that the run's data set splits into
    ``num_nodes`` partitions as every node will split it (one line saying how);
    :class:`~flwr_fedgkt.data.PartitionError` says why not. In simulation
    ``num-partitions`` is the number of SuperNodes; in a deployment each node
    states its own, at least as many as the nodes connected."""
    return check_partitions(config.dataset, num_nodes, **_split_options(config))
