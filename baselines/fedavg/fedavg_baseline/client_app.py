"""FedAvg ClientApp: each node trains the full model on its partition.

The node's data comes from the same functions FedGKT's ClientApp uses
(:func:`flwr_fedgkt.node.partition_ids`, :func:`~flwr_fedgkt.node.load_node_partition`),
so partitions and train/test splits are identical for the same run config;
shuffling (and augmentation) is seeded per node and round exactly as FedGKT's edge
training is. No state is kept between rounds: every round starts from the global
model and a fresh optimizer.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from flwr_fedgkt.data import Partition
from flwr_fedgkt.edge import resolve_device
from flwr_fedgkt.edge_data import edge_generator
from flwr_fedgkt.models import build_model
from flwr_fedgkt.node import load_node_partition, partition_ids
from flwr_fedgkt.stragglers import node_slowdown, straggle
from flwr_fedgkt.threads import FairThreads

from .config import FedAvgConfig
from .task import evaluate_model, make_optimizer, train_model

app = ClientApp()

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


def node_partition(context: Context, config: FedAvgConfig) -> tuple[int, Partition]:
    """This node's partition id and data, from ``partition-id`` / ``num-partitions``
    in its node config."""
    partition_id, num_partitions = partition_ids(context.node_config)
    return partition_id, load_node_partition(partition_id, num_partitions, config.run)


def global_model(msg: Message, config: FedAvgConfig, num_classes: int) -> nn.Module:
    """The model the server sent, on this node's device, channels-last."""
    model = build_model(config.model, num_classes)
    model.load_state_dict(msg.content.array_records[ARRAYS_KEY].to_torch_state_dict())
    model = model.to(resolve_device(config.run.device))
    return model.to(memory_format=torch.channels_last)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model ``client-epochs`` epochs on this node's training split."""
    began = time.perf_counter()
    config = FedAvgConfig.from_mapping(context.run_config)
    FairThreads(config.run.torch_threads).start()  # torch-threads, as FedGKT's nodes
    partition_id, partition = node_partition(context, config)
    round_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    server_round = int(round_config.get("server-round", 0))  # type: ignore[arg-type]
    lr = float(round_config.get("client-lr", config.run.client_lr))  # type: ignore[arg-type]

    model = global_model(msg, config, partition.num_classes)
    optimizer = make_optimizer(model, config.optimizer, lr, config.momentum, config.weight_decay)
    training = time.perf_counter()
    metrics = train_model(
        model,
        partition.train,
        optimizer,
        epochs=config.run.client_epochs,
        batch_size=config.run.batch_size,
        generator=edge_generator(config.run.seed, partition_id, server_round),
        device=resolve_device(config.run.device),
    )
    metrics["edge-train-seconds"] = time.perf_counter() - training
    # a simulated slow node (slow-partitions / slowdown), as FedGKT's ClientApp
    straggle(node_slowdown(config.run, context.node_config), metrics["edge-train-seconds"])
    arrays = ArrayRecord(model.cpu().to(memory_format=torch.contiguous_format).state_dict())
    metrics["node-seconds"] = time.perf_counter() - began
    content = RecordDict(
        {
            ARRAYS_KEY: arrays,
            METRICS_KEY: MetricRecord({"num-examples": len(partition.train), **metrics}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this node's test split."""
    began = time.perf_counter()
    config = FedAvgConfig.from_mapping(context.run_config)
    FairThreads(config.run.torch_threads).start()
    _, partition = node_partition(context, config)
    model = global_model(msg, config, partition.num_classes)
    scores = evaluate_model(model, partition.test, device=resolve_device(config.run.device))
    scores["node-seconds"] = time.perf_counter() - began
    content = RecordDict(
        {METRICS_KEY: MetricRecord({"num-examples": len(partition.test), **scores})}
    )
    return Message(content=content, reply_to=msg)
