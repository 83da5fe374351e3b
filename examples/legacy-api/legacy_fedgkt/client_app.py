"""The legacy ClientApp: ``client_fn`` returns FedGKT's ``NumPyClient``.

This is the part a deployment writes itself: hand the node's data (images, labels
and a stable id per sample) to :class:`~flwr_fedgkt.compat.FedGKTNumPyClient`.
Here the data are this node's partition of the run's data set, chosen by
``partition-id`` / ``num-partitions`` in the node config; a deployment with its own
``DataLoader`` passes it instead, its batches being ``(images, labels, sample_ids)``.
"""

from flwr.app import Context
from flwr.client import Client, ClientApp

from flwr_fedgkt.compat import FedGKTNumPyClient
from flwr_fedgkt.config import RunConfig
from flwr_fedgkt.node import load_node_partition, partition_ids


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
