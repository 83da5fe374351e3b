"""FedGKT ClientApp: the edge side on Flower's Message API.

The handlers translate Messages: they read the round's config and the server
logits from the message, run the node's side of the round
(:mod:`flwr_fedgkt.node`) and build the reply. The edge model and its optimizer
live in ``context.state`` between rounds (:class:`ContextStateStore`) and, with
``client-state-dir``, also on disk; edge weights never leave the node. ``train``
runs one round of edge training (with KD against the server logits that came with
the message) and replies with the training split's features, logits, labels and
ids; ``evaluate`` replies with the test split's features and labels, and the edge
model's own test accuracy. When the server says ``send-features = false``
(``freeze-extractor``: it holds this node's unchanging features already), replies
carry only sample ids and logits.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import node
from .config import RunConfig
from .data import Partition, SampleSet
from .edge import EdgeTrainer, Extracted, LogitTable, evaluate_metrics, train_metrics
from .node import EdgeStateStore, edge_state_store, round_run_config, round_settings
from .records import (
    CONFIG_KEY,
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    NODE_KEY,
    features_record,
    record_arrays,
)

app = ClientApp()

STATE_KEY = "edge_state"
"""The key of the edge state's ArrayRecord in ``context.state``."""

__all__ = [
    "STATE_KEY",
    "ContextStateStore",
    "app",
    "evaluate",
    "extract_test",
    "load_edge",
    "node_partition",
    "node_state_store",
    "round_settings",
    "save_edge",
    "train",
    "train_edge",
]


class ContextStateStore:
    """The edge state in a node's ``context.state``: one ``uint8`` array ``blob``
    in the ArrayRecord under ``key``."""

    def __init__(self, context: Context, key: str = STATE_KEY) -> None:
        self.context = context
        self.key = key

    def load(self) -> bytes | None:
        if self.key not in self.context.state.array_records:
            return None
        blob = self.context.state.array_records[self.key]["blob"].numpy()
        return blob.tobytes()

    def save(self, blob: bytes) -> None:
        array = np.frombuffer(blob, dtype=np.uint8)
        self.context.state[self.key] = ArrayRecord(array_dict={"blob": Array(array.copy())})


def node_state_store(context: Context, config: RunConfig, partition_id: int) -> EdgeStateStore:
    """The node's edge-state store: ``context.state`` first, then (with
    ``client-state-dir``) this partition's file; saves go to both."""
    return edge_state_store(ContextStateStore(context), config, partition_id)


def node_partition(context: Context, config: RunConfig) -> tuple[int, Partition]:
    """This node's data, from ``partition-id`` / ``num-partitions`` in its node config."""
    partition_id, num_partitions = node.partition_ids(context.node_config)
    return partition_id, node.load_node_partition(partition_id, num_partitions, config)


def load_edge(
    context: Context, config: RunConfig, num_classes: int, partition_id: int
) -> EdgeTrainer:
    """The node's edge trainer, restored from ``context.state`` when it has one, else
    from ``client-state-dir`` (a resumed run) when that holds this partition's state."""
    store = node_state_store(context, config, partition_id)
    return node.load_edge(store, config, num_classes, partition_id)


def save_edge(
    context: Context, trainer: EdgeTrainer, config: RunConfig | None = None, partition_id: int = 0
) -> None:
    """Keep the edge state in ``context.state`` and, with ``client-state-dir`` set in
    ``config``, also on disk (written atomically), so that a resumed run continues
    from it."""
    store: EdgeStateStore = ContextStateStore(context)
    if config is not None:
        store = node_state_store(context, config, partition_id)
    node.save_edge(store, trainer)


def train_edge(
    context: Context,
    config: RunConfig,
    partition_id: int,
    data: SampleSet,
    num_classes: int,
    server_round: int,
    teacher: LogitTable | None,
) -> tuple[Extracted, dict[str, float]]:
    """:func:`flwr_fedgkt.node.train_edge` with the edge state in ``context.state``
    (and ``client-state-dir``)."""
    store = node_state_store(context, config, partition_id)
    return node.train_edge(store, config, partition_id, data, num_classes, server_round, teacher)


def extract_test(
    context: Context, config: RunConfig, partition_id: int, data: SampleSet, num_classes: int
) -> tuple[Extracted, dict[str, float]]:
    """:func:`flwr_fedgkt.node.extract_test` with the edge state in ``context.state``
    (and ``client-state-dir``)."""
    store = node_state_store(context, config, partition_id)
    return node.extract_test(store, config, partition_id, data, num_classes)


def _round_settings(msg: Message, config: RunConfig) -> tuple[int, str]:
    return round_settings(msg.content.config_records.get(CONFIG_KEY, ConfigRecord()), config)


def _send_features(msg: Message) -> bool:
    """False when the server holds this node's features already (``freeze-extractor``)."""
    round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    return bool(round_config.get("send-features", True))


def _meta(server_round: int, dtype: str, partition_id: int) -> ConfigRecord:
    """What every reply echoes back (its round and feature dtype) and the node's
    stable key: its partition id."""
    return ConfigRecord(
        {"server-round": server_round, "feature-dtype": dtype, NODE_KEY: str(partition_id)}
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of edge training, then upload features, logits, labels and ids.

    The round's training settings (client-epochs, client-lr, batch-size,
    temperature, alpha) come from the server's round config, the run config
    giving the ones it leaves out."""
    round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    config = round_run_config(RunConfig.from_mapping(context.run_config), round_config)
    partition_id, partition = node_partition(context, config)
    server_round, dtype = _round_settings(msg, config)

    teacher = None
    if LOGITS_KEY in msg.content.array_records:
        arrays = record_arrays(msg.content.array_records[LOGITS_KEY])
        teacher = LogitTable(arrays["ids"], arrays["logits"])

    extracted, metrics = train_edge(
        context, config, partition_id, partition.train, partition.num_classes, server_round, teacher
    )

    content = RecordDict(
        {
            FEATURES_KEY: features_record(extracted, dtype, with_features=_send_features(msg)),
            METRICS_KEY: MetricRecord(
                {"num-examples": len(partition.train), **train_metrics(metrics)}
            ),
            META_KEY: _meta(server_round, dtype, partition_id),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Upload the test split's features and labels; score the edge model locally."""
    config = RunConfig.from_mapping(context.run_config)
    partition_id, partition = node_partition(context, config)
    server_round, dtype = _round_settings(msg, config)
    extracted, scores = extract_test(
        context, config, partition_id, partition.test, partition.num_classes
    )
    content = RecordDict(
        {
            FEATURES_KEY: features_record(
                extracted, dtype, with_logits=False, with_features=_send_features(msg)
            ),
            METRICS_KEY: MetricRecord(
                {
                    "num-examples": len(partition.test),
                    **evaluate_metrics(scores),
                }
            ),
            META_KEY: _meta(server_round, dtype, partition_id),
        }
    )
    return Message(content=content, reply_to=msg)
