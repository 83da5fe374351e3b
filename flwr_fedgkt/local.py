"""FedGKT rounds in one process, without Flower.

The same calls the Flower apps make (edge training and extraction per partition,
the wire codec) and the same :class:`~flwr_fedgkt.rounds.RoundEngine` the
strategies hold (validation, server training, server logits, scoring, the round's
log), with no transport in between. Used to check that the Flower layer adds
nothing but transport, and as the baseline of the overhead benchmark.

This module imports no Flower code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Partition
from .edge import Extracted, LogitTable, evaluate_metrics, train_metrics
from .edge_state import MemoryStateStore
from .faces import engine_settings
from .node import EdgeNode, load_node_partition, partition_node
from .rounds import RoundEngine
from .server import ServerTrainer
from .settings import RunConfig
from .validation import NODE_KEY, ReplyParts

__all__ = ["LocalRun", "local_engine", "run_local"]


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
    defences: dict[str, float],
    held: str = "",
) -> ReplyParts:
    arrays = extracted.arrays(dtype, with_logits=training, held=held)
    meta = {"server-round": server_round, "feature-dtype": dtype, NODE_KEY: key, **defences}
    return meta, arrays, {"num-examples": len(extracted.labels), **metrics}


def run_local(
    config: RunConfig, num_partitions: int, verbose: bool = False
) -> list[dict[str, Any]]:
    """Run ``config.num_server_rounds`` FedGKT rounds over ``num_partitions`` nodes
    with full participation; return one record per round (as in ``results.json``)."""
    return local_engine(config, num_partitions, verbose).engine.history


@dataclass
class LocalRun:
    """A finished in-process run: the server's round engine (history, server
    model, store, privacy ledger), and each node with its partition."""

    engine: RoundEngine
    nodes: list[EdgeNode]
    partitions: list[Partition]


def local_engine(
    config: RunConfig,
    num_partitions: int,
    verbose: bool = False,
    taking_part: list[int] | None = None,
) -> LocalRun:
    """:func:`run_local`, returning the run's engine, nodes and partitions; only
    the partitions ``taking_part`` (all when None) have a node, so that the
    others' data stays out of the run."""
    ids = list(range(num_partitions)) if taking_part is None else list(taking_part)
    partitions = [load_node_partition(i, num_partitions, config) for i in ids]
    num_classes = partitions[0].num_classes
    nodes = [partition_node(config, i, num_classes, MemoryStateStore()) for i in ids]
    num_partitions = len(ids)
    on_round_end = (lambda record: print(record, flush=True)) if verbose else None
    trainer = ServerTrainer.from_run_config(config, num_classes)
    engine = RoundEngine(trainer, on_round_end=on_round_end, **engine_settings(config))
    engine.connected = lambda: range(num_partitions)
    dtype = config.feature_dtype
    for server_round in range(1, config.num_server_rounds + 1):
        engine.begin_round(server_round)
        accepted = []
        for i, (node, part) in enumerate(zip(nodes, partitions, strict=True)):
            held, logits = engine.instructions(i, training=True)
            teacher = None if logits is None else LogitTable(*logits)
            frozen = engine.frozen(server_round)
            extracted, metrics = node.train(part.train, server_round, teacher, frozen=frozen)
            parts = _upload(
                extracted,
                dtype,
                server_round,
                str(i),
                train_metrics(metrics),
                True,
                node.defences.meta(),
                held,
            )
            reply = engine.accept(LocalReply(i, parts), server_round, training=True)
            if reply is not None:
                accepted.append(reply)
        engine.train_round(server_round, accepted)
        scored = []
        for i, (node, part) in enumerate(zip(nodes, partitions, strict=True)):
            extracted, scores = node.evaluate(part.test, server_round)
            parts = _upload(
                extracted,
                dtype,
                server_round,
                str(i),
                evaluate_metrics(scores),
                False,
                node.defences.meta(),
                engine.instructions(i, training=False)[0],
            )
            reply = engine.accept(LocalReply(i, parts), server_round, training=False)
            if reply is not None:
                scored.append(reply)
        engine.close_round(server_round, scored)
    return LocalRun(engine, nodes, partitions)
