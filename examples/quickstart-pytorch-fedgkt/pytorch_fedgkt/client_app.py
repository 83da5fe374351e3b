"""pytorch_fedgkt: A Flower / PyTorch app, trained with FedGKT.

Flower's quickstart ClientApp loads the global Net from the message, trains it
and replies with its weights. Here each node keeps its own edge part of Net (in
``context.state``, between rounds), and ``FedGKTClient`` does a round's work: it
trains the edge part on the node's partition with cross-entropy plus distillation
from the server's logits, and replies with the features, logits and labels of
the node's images. No weights leave the node.
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_fedgkt import FedGKTClient, default_node_key, key_reply
from pytorch_fedgkt.pair import net_pair
from pytorch_fedgkt.task import load_partition, pytorch_transforms

# Flower ClientApp
app = ClientApp()


def fedgkt_client(context: Context) -> FedGKTClient:
    """This node's edge part of Net and its partition (the flwr-datasets splits)."""
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    config = context.run_config
    partition = load_partition(partition_id, num_partitions, str(config["dataset"]))
    seed = int(config["seed"])
    shared = bool(config["shared-extractor"])
    lr = float(config["learning-rate"])
    return FedGKTClient(
        lambda: net_pair(seed).edge,  # every node starts from the same Net
        partition["train"],
        partition["test"],
        transform=pytorch_transforms,
        epochs=int(config["local-epochs"]),
        lr=lr,
        batch_size=int(config["batch-size"]),
        optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
        freeze_extractor=shared,  # shared: the extractor stays as built, on every node
        seed=seed,
    )


@app.train()
def train(msg: Message, context: Context):
    """Train the edge model on local data; reply with its features and logits."""
    return fedgkt_client(context).train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    """Reply with the features of the local test split and the edge model's scores."""
    return fedgkt_client(context).evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context):
    """Tell the server this node's key (its partition id); no data is loaded."""
    return key_reply(msg, default_node_key(context.node_config), context)
