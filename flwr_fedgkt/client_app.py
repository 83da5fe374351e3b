"""FedGKT ClientApp: the edge side on Flower's Message API.

The edge model and its optimizer live in ``context.state`` between rounds; edge
weights never leave the node. ``train`` runs one round of edge training (with KD
against the server logits that came with the message) and replies with the
training split's features, logits, labels and ids; ``evaluate`` replies with the
test split's features and labels, and the edge model's own test accuracy. When the
server says ``send-features = false`` (``freeze-extractor``: it holds this node's
unchanging features already), replies carry only sample ids and logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import RunConfig
from .data import Partition, SampleSet, load_partition
from .edge import (
    EdgeTrainer,
    Extracted,
    LogitTable,
    edge_generator,
    evaluate_metrics,
    train_metrics,
)
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


def node_partition(context: Context, config: RunConfig) -> tuple[int, Partition]:
    """This node's data, from ``partition-id`` / ``num-partitions`` in its node config."""
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err.args[0]!r}; start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
    return partition_id, load_partition(
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


def _state_file(config: RunConfig, partition_id: int) -> Path | None:
    if not config.client_state_dir:
        return None
    return Path(config.client_state_dir) / f"edge-partition-{partition_id}.pt"


def load_edge(
    context: Context, config: RunConfig, num_classes: int, partition_id: int
) -> EdgeTrainer:
    """The node's edge trainer, restored from ``context.state`` when it has one, else
    from ``client-state-dir`` (a resumed run) when that holds this partition's state."""
    trainer = EdgeTrainer(
        num_classes,
        lr=config.client_lr,
        device=config.device,
        seed=config.seed + partition_id,
        freeze_extractor=config.freeze_extractor,
    )
    state_file = _state_file(config, partition_id)
    if STATE_KEY in context.state.array_records:
        blob = context.state.array_records[STATE_KEY]["blob"].numpy()
        trainer.load_state_bytes(blob.tobytes())
    elif state_file is not None and state_file.exists():
        trainer.load_state_bytes(state_file.read_bytes())
    return trainer


def save_edge(
    context: Context, trainer: EdgeTrainer, config: RunConfig | None = None, partition_id: int = 0
) -> None:
    """Keep the edge state in ``context.state`` and, with ``client-state-dir`` set,
    also on disk (written atomically), so that a resumed run continues from it."""
    state = trainer.state_bytes()
    blob = np.frombuffer(state, dtype=np.uint8)
    context.state[STATE_KEY] = ArrayRecord(array_dict={"blob": Array(blob.copy())})
    state_file = None if config is None else _state_file(config, partition_id)
    if state_file is not None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(state)
        os.replace(tmp, state_file)


def round_settings(round_config: Mapping[str, Any], config: RunConfig) -> tuple[int, str]:
    """``(server round, feature dtype)`` of a round's config from the server."""
    server_round = int(round_config.get("server-round", 0))
    dtype = str(round_config.get("feature-dtype", config.feature_dtype))
    return server_round, dtype


def _round_settings(msg: Message, config: RunConfig) -> tuple[int, str]:
    return round_settings(msg.content.config_records.get(CONFIG_KEY, ConfigRecord()), config)


def _send_features(msg: Message) -> bool:
    """False when the server holds this node's features already (``freeze-extractor``)."""
    round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    return bool(round_config.get("send-features", True))


def train_edge(
    context: Context,
    config: RunConfig,
    partition_id: int,
    data: SampleSet,
    num_classes: int,
    server_round: int,
    teacher: LogitTable | None,
) -> tuple[Extracted, dict[str, float]]:
    """One edge round on this node: restore the edge model from ``context.state``,
    train it on ``data`` (KD against ``teacher`` by sample id), extract features,
    logits, labels and ids over ``data``, and save the edge state again."""
    trainer = load_edge(context, config, num_classes, partition_id)
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
    save_edge(context, trainer, config, partition_id)
    return extracted, metrics


def extract_test(
    context: Context, config: RunConfig, partition_id: int, data: SampleSet, num_classes: int
) -> tuple[Extracted, dict[str, float]]:
    """The edge model's features over ``data`` (a test split) and its own
    ``{"loss", "accuracy"}`` on them."""
    trainer = load_edge(context, config, num_classes, partition_id)
    extracted = trainer.extract(data)
    return extracted, EdgeTrainer.score(extracted.logits, extracted.labels)


def _meta(server_round: int, dtype: str, partition_id: int) -> ConfigRecord:
    """What every reply echoes back (its round and feature dtype) and the node's
    stable key: its partition id."""
    return ConfigRecord(
        {"server-round": server_round, "feature-dtype": dtype, NODE_KEY: str(partition_id)}
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of edge training, then upload features, logits, labels and ids."""
    config = RunConfig.from_mapping(context.run_config)
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
