"""FedGKT's ClientApp with two misbehaving partitions (for fault tests)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from flwr_fedgkt import client_app as fedgkt

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if partition_id == 3:
        raise RuntimeError("simulated crash on partition 3")
    reply = fedgkt.train(msg, context)
    if partition_id == 2:
        arrays = reply.content.array_records["features"]
        labels = arrays["labels"].numpy()
        arrays["labels"] = Array(np.full(labels.shape, 1000, dtype=np.int64))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedgkt.evaluate(msg, context)
