"""pytorch_fedgkt: the ClientApp (the edge side of FedGKT).

The node trains its own EdgeNet on its own data; FedGKTClient does a round's
work: it keeps the edge model in ``context.state`` between rounds, distils from
the server logits that came with the message, and replies with the features,
logits, labels and sample ids of the training data. Edge weights never leave the node.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_fedgkt import FedGKTClient
from pytorch_fedgkt.task import EdgeNet, load_data, seeded

app = ClientApp()


def fedgkt_client(context: Context) -> FedGKTClient:
    """This node's data and its edge model, seeded per node."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    train_data, test_data = load_data(partition_id, num_partitions)
    seed = int(context.run_config["seed"]) + partition_id
    # lr, epochs and batch size come with each round's config from the server
    return FedGKTClient(lambda: seeded(EdgeNet, seed), train_data, test_data, seed=seed)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train EdgeNet on the local data; upload its features and logits."""
    return fedgkt_client(context).train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Upload the test data's features; report EdgeNet's own accuracy."""
    return fedgkt_client(context).evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's key (its partition id) before its first round."""
    return fedgkt_client(context).query(msg, context)
