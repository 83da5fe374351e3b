"""The node's side of a round: its data, its edge state, training and extraction.

A node holds one partition of the run's data set and an edge model (with its
optimizer) that persists between rounds and never leaves the node. Each round it
restores the edge model, trains it on its training split (with KD against the
server logits, looked up by sample id), extracts features, logits, labels and ids
over that split and saves the edge state again; on evaluation it extracts over
its test split and scores the edge model on it.

Where the edge state lives is an :class:`EdgeStateStore`: anything that loads and
saves one blob of bytes. :class:`DirectoryStateStore` keeps it in
``client-state-dir`` (``edge-partition-<i>.pt``, written atomically), so that a
restarted node continues from it; the Flower layer keeps it in ``context.state``
(:class:`flwr_fedgkt.client_app.ContextStateStore`). :func:`edge_state_store`
puts the two together: restore from the node's own store when it holds a state,
else from the directory; save to both.

This module imports no Flower code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import RunConfig
from .data import Partition, SampleSet, load_partition
from .edge import EdgeTrainer, Extracted, LogitTable, edge_generator

__all__ = [
    "EdgeStateStore",
    "DirectoryStateStore",
    "LayeredStateStore",
    "edge_state_file",
    "edge_state_store",
    "partition_ids",
    "load_node_partition",
    "round_settings",
    "new_edge_trainer",
    "load_edge",
    "save_edge",
    "train_edge",
    "extract_test",
]


# -- data ---------------------------------------------------------------------------
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


def load_node_partition(partition_id: int, num_partitions: int, config: RunConfig) -> Partition:
    """Partition ``partition_id`` of ``num_partitions`` of the run's data set, as the
    run config partitions it."""
    return load_partition(
        config.dataset,
        partition_id,
        num_partitions,
        partitioner=config.partitioner,
        dirichlet_alpha=config.dirichlet_alpha,
        seed=config.seed,
        classes_per_partition=config.classes_per_partition,
        min_partition_size=config.min_partition_size,
        data_dir=config.data_dir,
    )


ROUND_KEYS = ("client-epochs", "client-lr", "batch-size", "temperature", "alpha")
"""Training settings the server's round config may set for a round (run config
keys); the run config gives the ones it leaves out."""


def round_run_config(config: RunConfig, round_config: Mapping[str, Any]) -> RunConfig:
    """``config`` with the round's training settings (:data:`ROUND_KEYS`) from the
    server's round config, so that a strategy can change the edge's epochs,
    learning rate, batch size, T or alpha by round; each value is checked as a
    run-config value would be (ConfigError names a bad one)."""
    overrides = {key: round_config[key] for key in ROUND_KEYS if key in round_config}
    if not overrides:
        return config
    return RunConfig.from_mapping({**config.to_dict(), **overrides})


def round_settings(round_config: Mapping[str, Any], config: RunConfig) -> tuple[int, str]:
    """``(server round, feature dtype)`` of a round's config from the server."""
    server_round = int(round_config.get("server-round", 0))
    dtype = str(round_config.get("feature-dtype", config.feature_dtype))
    return server_round, dtype


# -- edge state ---------------------------------------------------------------------
class EdgeStateStore(Protocol):
    """Where a node keeps its serialised edge state between rounds."""

    def load(self) -> bytes | None:
        """The saved state, or None when there is none."""

    def save(self, blob: bytes) -> None:
        """Keep ``blob`` as the state."""


def edge_state_file(directory: str | Path, partition_id: int) -> Path:
    """The file a partition's edge state is kept in under ``directory``."""
    return Path(directory) / f"edge-partition-{partition_id}.pt"


class DirectoryStateStore:
    """One partition's edge state in a directory (``client-state-dir``): the file
    ``edge-partition-<partition_id>.pt``, replaced atomically on every save."""

    def __init__(self, directory: str | Path, partition_id: int) -> None:
        self.path = edge_state_file(directory, partition_id)

    def __repr__(self) -> str:
        return f"DirectoryStateStore({str(self.path)!r})"

    def load(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None

    def save(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, self.path)


class LayeredStateStore:
    """Several stores as one: ``load`` returns the first state found, in order;
    ``save`` writes to every store, in order."""

    def __init__(self, *stores: EdgeStateStore) -> None:
        self.stores = stores

    def __repr__(self) -> str:
        return f"LayeredStateStore{self.stores!r}"

    def load(self) -> bytes | None:
        for store in self.stores:
            blob = store.load()
            if blob is not None:
                return blob
        return None

    def save(self, blob: bytes) -> None:
        for store in self.stores:
            store.save(blob)


def edge_state_store(
    primary: EdgeStateStore, config: RunConfig, partition_id: int
) -> EdgeStateStore:
    """The store a node's round uses: ``primary`` (the node's own, e.g. Flower's
    ``context.state``) and, with ``client-state-dir`` set, this partition's file
    there. A state in ``primary`` wins; the file is read only when ``primary`` has
    none (a restarted node); both are saved to."""
    if not config.client_state_dir:
        return primary
    return LayeredStateStore(primary, DirectoryStateStore(config.client_state_dir, partition_id))


# -- edge rounds --------------------------------------------------------------------
def new_edge_trainer(config: RunConfig, num_classes: int, partition_id: int) -> EdgeTrainer:
    """A fresh edge trainer for a partition, its model seeded with
    ``seed + partition_id``."""
    return EdgeTrainer(
        num_classes,
        lr=config.client_lr,
        device=config.device,
        seed=config.seed + partition_id,
        freeze_extractor=config.freeze_extractor,
    )


def load_edge(
    store: EdgeStateStore, config: RunConfig, num_classes: int, partition_id: int
) -> EdgeTrainer:
    """The node's edge trainer, restored from ``store`` when it holds a state, else
    fresh."""
    trainer = new_edge_trainer(config, num_classes, partition_id)
    blob = store.load()
    if blob is not None:
        trainer.load_state_bytes(blob)
        trainer.set_lr(config.client_lr)  # this round's rate, not the saved one
    return trainer


def save_edge(store: EdgeStateStore, trainer: EdgeTrainer) -> None:
    """Keep the edge model's and optimizer's state in ``store``."""
    store.save(trainer.state_bytes())


def train_edge(
    store: EdgeStateStore,
    config: RunConfig,
    partition_id: int,
    data: SampleSet,
    num_classes: int,
    server_round: int,
    teacher: LogitTable | None,
) -> tuple[Extracted, dict[str, float]]:
    """One edge round on this node: restore the edge model from ``store``, train it
    on ``data`` (KD against ``teacher`` by sample id; shuffling seeded by
    ``edge_generator(seed, partition_id, server_round)``), extract features, logits,
    labels and ids over ``data``, and save the edge state to ``store`` again."""
    trainer = load_edge(store, config, num_classes, partition_id)
    generator = edge_generator(config.seed, partition_id, server_round)
    metrics = trainer.train(
        data,
        epochs=config.client_epochs,
        batch_size=config.batch_size,
        teacher=teacher,
        temperature=config.temperature,
        alpha=config.alpha,
        generator=generator,
    )
    extracted = trainer.extract(data)
    save_edge(store, trainer)
    return extracted, metrics


def extract_test(
    store: EdgeStateStore,
    config: RunConfig,
    partition_id: int,
    data: SampleSet,
    num_classes: int,
) -> tuple[Extracted, dict[str, float]]:
    """The edge model's features over ``data`` (a test split) and its own
    ``{"loss", "accuracy"}`` on them; nothing is saved."""
    trainer = load_edge(store, config, num_classes, partition_id)
    extracted = trainer.extract(data)
    return extracted, EdgeTrainer.score(extracted.logits, extracted.labels)
