"""The legacy ClientApp: ``client_fn`` returns FedGKT's ``NumPyClient``.

This is the part a deployment writes itself: hand the node's data (images, labels
and a stable id per sample) to :class:`~flwr_fedgkt.legacy.FedGKTNumPyClient`.
Here the data are this node's partition of the run's data set, chosen by
``partition-id`` / ``num-partitions`` in the node config; a deployment passes its
own instead: a ``Dataset`` of ``(x, y)`` or ``(x, y, sample_id)`` items, or a
``DataLoader`` whose batches are ``(images, labels, sample_ids)``, and with
``edge_model=`` its own edge model in place of the built-in ResNet-8.
"""

from flwr.app import Context
from flwr.client import Client, ClientApp

from flwr_fedgkt.legacy import FedGKTNumPyClient
from flwr_fedgkt.node import load_node_partition, partition_ids
from flwr_fedgkt.settings import RunConfig


def client_fn(context: Context) -> Client:
    """FedGKT's edge client on this node's train and test split."""
    config = RunConfig.from_mapping(context.run_config)
    partition_id, num_partitions = partition_ids(context.node_config)
    partition = load_node_partition(partition_id, num_partitions, config)
    return FedGKTNumPyClient(
        context,
        train=partition.train,
        test=partition.test,
        num_classes=partition.num_classes,
        partition_id=partition_id,
    ).to_client()


app = ClientApp(client_fn=client_fn)
