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

from .edge import Extracted, LogitTable, evaluate_metrics, train_metrics
from .edge_state import MemoryStateStore
from .faces import engine_settings
from .node import load_node_partition, partition_node
from .rounds import RoundEngine
from .server import ServerTrainer
from .settings import RunConfig
from .validation import NODE_KEY, ReplyParts

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
    arrays = extracted.arrays(dtype, with_logits=training)
    meta = {"server-round": server_round, "feature-dtype": dtype, NODE_KEY: key}
    return meta, arrays, {"num-examples": len(extracted.labels), **metrics}


def run_local(
    config: RunConfig, num_partitions: int, verbose: bool = False
) -> list[dict[str, Any]]:
    """Run ``config.num_server_rounds`` FedGKT rounds over ``num_partitions`` nodes
    with full participation; return one record per round (as in ``results.json``)."""
    partitions = [load_node_partition(i, num_partitions, config) for i in range(num_partitions)]
    num_classes = partitions[0].num_classes
    nodes = [
        partition_node(config, i, num_classes, MemoryStateStore()) for i in range(num_partitions)
    ]
    on_round_end = (lambda record: print(record, flush=True)) if verbose else None
    trainer = ServerTrainer.from_run_config(config, num_classes)
    engine = RoundEngine(trainer, on_round_end=on_round_end, **engine_settings(config))
    engine.connected = lambda: range(num_partitions)
    dtype = config.feature_dtype
    for server_round in range(1, config.num_server_rounds + 1):
        engine.begin_round(server_round)
        accepted = []
        for i, (node, part) in enumerate(zip(nodes, partitions, strict=True)):
            _, logits = engine.instructions(i, training=True)
            teacher = None if logits is None else LogitTable(*logits)
            frozen = engine.frozen(server_round)
            extracted, metrics = node.train(part.train, server_round, teacher, frozen=frozen)
            parts = _upload(extracted, dtype, server_round, str(i), train_metrics(metrics), True)
            reply = engine.accept(LocalReply(i, parts), server_round, training=True)
            if reply is not None:
                accepted.append(reply)
        engine.train_round(server_round, accepted)
        scored = []
        for i, (node, part) in enumerate(zip(nodes, partitions, strict=True)):
            extracted, scores = node.evaluate(part.test, server_round)
            parts = _upload(
                extracted, dtype, server_round, str(i), evaluate_metrics(scores), training=False
            )
            reply = engine.accept(LocalReply(i, parts), server_round, training=False)
            if reply is not None:
                scored.append(reply)
        engine.close_round(server_round, scored)
    return engine.history
