"""FedGKT rounds in one process, without Flower.

The same calls the Flower apps make (edge training and extraction per partition,
the wire codec) and the same :class:`~flwr_fedgkt.rounds.RoundEngine` the
strategies hold (validation, server training, server logits, scoring, the round's
log), with no transport in between. Used to check that the Flower layer adds
nothing but transport, and as the baseline of the overhead benchmark.

This module imports no Flower code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import RunConfig
from .edge import (
    EdgeTrainer,
    Extracted,
    LogitTable,
    edge_generator,
    evaluate_metrics,
)
from .features import encode_features
from .node import load_node_partition, new_edge_trainer
from .rounds import NODE_KEY, ReplyParts, RoundEngine
from .server import ServerTrainer

__all__ = ["run_local"]


class LocalReply:
    """A node's upload handed to the engine directly (no transport)."""

    def __init__(self, node_id: int, parts: ReplyParts) -> None:
        self.node_id = node_id
        self.parts = parts
        self.nbytes = sum(int(a.nbytes) for a in parts[1].values())

    def read(self) -> ReplyParts:
        return self.parts


def _upload(
    extracted: Extracted,
    dtype: str,
    server_round: int,
    key: str,
    metrics: dict[str, float],
    training: bool,
) -> ReplyParts:
    arrays = encode_features(extracted.features, dtype).arrays()
    arrays.update(labels=extracted.labels.numpy(), ids=extracted.ids.numpy().astype(np.int64))
    if training:
        arrays["logits"] = extracted.logits.numpy()
    meta = {"server-round": server_round, "feature-dtype": dtype, NODE_KEY: key}
    return meta, arrays, {"num-examples": len(extracted.labels), **metrics}


def run_local(
    config: RunConfig, num_partitions: int, verbose: bool = False
) -> list[dict[str, Any]]:
    """Run ``config.num_server_rounds`` FedGKT rounds over ``num_partitions`` nodes
    with full participation; return one record per round (as in ``results.json``)."""
    partitions = [load_node_partition(i, num_partitions, config) for i in range(num_partitions)]
    num_classes = partitions[0].num_classes
    edges = [new_edge_trainer(config, num_classes, i) for i in range(num_partitions)]
    on_round_end = (lambda record: print(record, flush=True)) if verbose else None
    trainer = ServerTrainer.from_run_config(config, num_classes)
    engine = RoundEngine(trainer, on_round_end=on_round_end, **RoundEngine.settings(config))
    engine.connected = lambda: range(num_partitions)
    dtype = config.feature_dtype
    for server_round in range(1, config.num_server_rounds + 1):
        engine.begin_round(server_round)
        accepted = []
        for i, (edge, part) in enumerate(zip(edges, partitions, strict=True)):
            _, logits = engine.instructions(i, training=True)
            metrics = edge.train(
                part.train,
                epochs=config.client_epochs,
                batch_size=config.batch_size,
                teacher=None if logits is None else LogitTable(*logits),
                temperature=config.temperature,
                alpha=config.alpha,
                generator=edge_generator(config.seed, i, server_round),
            )
            edge_metrics = {"train-loss": metrics["train_loss"]}
            edge_metrics["train-accuracy"] = metrics["train_accuracy"]
            parts = _upload(
                edge.extract(part.train), dtype, server_round, str(i), edge_metrics, True
            )
            reply = engine.accept(LocalReply(i, parts), server_round, training=True)
            if reply is not None:
                accepted.append(reply)
        engine.train_round(server_round, accepted)
        scored = []
        for i, (edge, part) in enumerate(zip(edges, partitions, strict=True)):
            extracted = edge.extract(part.test)
            scores = evaluate_metrics(EdgeTrainer.score(extracted.logits, extracted.labels))
            parts = _upload(extracted, dtype, server_round, str(i), scores, training=False)
            reply = engine.accept(LocalReply(i, parts), server_round, training=False)
            if reply is not None:
                scored.append(reply)
        engine.close_round(server_round, scored)
    return engine.history
