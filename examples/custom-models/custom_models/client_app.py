"""custom_models: the ClientApp, with the node's own EdgeMLP.

FedGKTClient takes any edge model whose ``forward`` returns ``(logits,
features)``, and any data set of ``(x, y, sample_id)`` items.
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from custom_models.task import load_data, new_edge_model
from flwr_fedgkt import FedGKTClient

app = ClientApp()


def fedgkt_client(context: Context) -> FedGKTClient:
    """This node's data and EdgeMLP, with the edge training settings."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    train_data, test_data = load_data(partition_id, num_partitions)
    seed = int(context.run_config["seed"]) + partition_id
    return FedGKTClient(
        lambda: new_edge_model(seed),
        train_data,
        test_data,
        epochs=int(context.run_config["client-epochs"]),
        lr=float(context.run_config["client-lr"]),
        batch_size=int(context.run_config["batch-size"]),
        temperature=float(context.run_config["temperature"]),
        alpha=float(context.run_config["alpha"]),
        # any optimizer: FedGKTClient sets its learning rate to the round's client-lr
        optimizer=lambda params: torch.optim.AdamW(params, weight_decay=1e-4),
        seed=seed,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train EdgeMLP on the local data; upload its 32-value features and logits."""
    return fedgkt_client(context).train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Upload the test data's features; report EdgeMLP's own accuracy."""
    return fedgkt_client(context).evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's key (its partition id) before its first round."""
    return fedgkt_client(context).query(msg, context)
