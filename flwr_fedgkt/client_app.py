"""FedGKT ClientApp: the built-in app's edge side, one user of :class:`FedGKTClient`.

Each node holds one partition of the run's data set (``partition-id`` /
``num-partitions`` in its node config) and trains the paper's edge ResNet-8,
initialised from ``seed + partition-id`` (``seed`` alone with
``shared-extractor-init``). Its settings come from the run config; the server's
round config overrides the training ones (client-epochs, client-lr, batch-size,
temperature, alpha). The edge state lives in ``context.state`` and, with
``client-state-dir``, also on disk.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .client import FedGKTClient, key_reply
from .node import edge_model_factory, load_node_partition, partition_ids
from .settings import RunConfig
from .stragglers import node_slowdown, straggle

app = ClientApp()

__all__ = ["app", "fedgkt_client", "train", "evaluate", "query"]


def fedgkt_client(context: Context, config: RunConfig | None = None) -> FedGKTClient:
    """The built-in node: its partition of the run's data set and ResNet-8, with
    the run config's settings (``config``: the context's, read already)."""
    config = RunConfig.from_mapping(context.run_config) if config is None else config
    partition_id, num_partitions = partition_ids(context.node_config)
    partition = load_node_partition(partition_id, num_partitions, config)
    return FedGKTClient(
        edge_model_factory(config, partition.num_classes, partition_id),
        partition.train,
        partition.test,
        node_key=str(partition_id),
        epochs=config.client_epochs,
        lr=config.client_lr,
        batch_size=config.batch_size,
        temperature=config.temperature,
        alpha=config.alpha,
        freeze_extractor=config.freeze_extractor,
        device=config.device,
        seed=config.seed,
        state_dir=config.client_state_dir or None,
        precision=config.precision,
        torch_threads=config.torch_threads,
        feature_noise=config.feature_noise,
        feature_clip=config.feature_clip,
        label_epsilon=config.label_epsilon,
        nopeek_weight=config.nopeek_weight,
        privacy=config.privacy,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of edge training, then upload features, logits, labels and ids
    (a simulated slow node, ``slow-partitions`` / ``slowdown``, holds its reply
    back for ``slowdown - 1`` times its training time)."""
    config = RunConfig.from_mapping(context.run_config)
    reply = fedgkt_client(context, config).train(msg, context)
    slowdown = node_slowdown(config, context.node_config)
    if slowdown > 1.0:
        trained = reply.content.metric_records["metrics"]["edge-train-seconds"]
        straggle(slowdown, float(trained) if isinstance(trained, (int, float)) else 0.0)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Upload the test split's features and labels; score the edge model locally."""
    return fedgkt_client(context).evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's key, its partition id, with its proof (no data
    is loaded)."""
    partition_id, _ = partition_ids(context.node_config)
    state_dir = RunConfig.from_mapping(context.run_config).client_state_dir or None
    return key_reply(msg, str(partition_id), context, state_dir)
