"""FedGKT's ClientApp with misbehaving partitions (for fault tests).

Partition 2 sends labels out of range, 3 raises, 4 sends a list-valued metric (in
training and evaluation), 5 sends int8 features whose scale is 1e37. Partitions 0
and 1 behave. With ``every-node-raises = true`` every node raises the same error.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from flwr_fedgkt import client_app as fedgkt

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if context.run_config.get("every-node-raises"):
        raise ValueError("item 0 of the data set is a dict without 'img' (keys: image, label)")
    if partition_id == 3:
        raise RuntimeError("simulated crash on partition 3")
    reply = fedgkt.train(msg, context)
    arrays = reply.content.array_records["features"]
    if partition_id == 2:
        labels = arrays["labels"].numpy()
        arrays["labels"] = Array(np.full(labels.shape, 1000, dtype=np.int64))
    if partition_id == 4:
        reply.content.metric_records["metrics"]["train-loss"] = [1.0, 2.0]
    if partition_id == 5:
        scale = arrays["feature_scale"].numpy()
        arrays["feature_scale"] = Array(np.full(scale.shape, 1e37, dtype=np.float32))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    reply = fedgkt.evaluate(msg, context)
    if partition_id == 4:
        reply.content.metric_records["metrics"]["edge-accuracy"] = [0.5]
    return reply
