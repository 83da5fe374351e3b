"""FedGKT's ClientApp with misbehaving partitions (for fault tests).

Partition 2 sends labels out of range, 3 raises, 4 sends a list-valued metric (in
training and evaluation: in the test upload of its training reply, or in its
evaluation reply), 5 sends int8 features whose scale is 1e37. Partitions 0
and 1 behave. With ``every-node-raises = true`` every node raises the same error.

With ``impostor = true``, in a resumed run (``resume-from`` set) the last partition
speaks for node key ``"0"`` instead of its own, with a signing key of its own: it
answers the key query with key ``"0"`` (partition 0 answers none in that run, so
the impostor's claim is the only one), trains and evaluates under key ``"0"``,
and writes ``impostor-got-logits`` to ``output-dir`` if the server ever sends it
server logits. In the first run every node behaves;
in the second, all but the impostor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flwr_fedgkt import client_app as fedgkt
from flwr_fedgkt.client import FedGKTClient, key_reply
from flwr_fedgkt.records import LOGITS_KEY

app = ClientApp()

VICTIM_KEY = "0"


def _impostor(context: Context) -> bool:
    """Whether this node is the impostor of a resumed run."""
    config = context.run_config
    last = int(context.node_config["num-partitions"]) - 1
    return (
        bool(config.get("impostor"))
        and bool(config.get("resume-from"))
        and (int(context.node_config["partition-id"]) == last)
    )


def _state_dir(context: Context) -> str:
    """The impostor's own state dir (a node of its own has a disk of its own)."""
    return str(Path(str(context.run_config["client-state-dir"])) / "impostor")


def _impostor_client(context: Context) -> FedGKTClient:
    client = fedgkt.fedgkt_client(context)
    client.node_key = VICTIM_KEY
    client.state_dir = _state_dir(context)
    return client


@app.query()
def query(msg: Message, context: Context) -> Message:
    if _impostor(context):
        return key_reply(msg, VICTIM_KEY, context, _state_dir(context))
    config = context.run_config
    if config.get("impostor") and config.get("resume-from"):
        if int(context.node_config["partition-id"]) == 0:
            # only the impostor answers for key "0"; node "0" proves it in training
            return Message(RecordDict(), reply_to=msg)
    return fedgkt.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if context.run_config.get("every-node-raises"):
        raise ValueError("item 0 of the data set is a dict without 'img' (keys: image, label)")
    if _impostor(context):
        if LOGITS_KEY in msg.content.array_records:
            output_dir = Path(str(context.run_config["output-dir"]))
            (output_dir / "impostor-got-logits").write_text(str(msg.metadata.dst_node_id))
        return _impostor_client(context).train(msg, context)
    if context.run_config.get("impostor"):  # the others behave
        return fedgkt.train(msg, context)
    if partition_id == 3:
        raise RuntimeError("simulated crash on partition 3")
    reply = fedgkt.train(msg, context)
    arrays = reply.content.array_records["features"]
    if partition_id == 2:
        labels = arrays["labels"].numpy()
        arrays["labels"] = Array(np.full(labels.shape, 1000, dtype=np.int64))
    if partition_id == 4:
        reply.content.metric_records["metrics"]["train-loss"] = [1.0, 2.0]
        if "test-metrics" in reply.content.metric_records:  # its test upload, too
            reply.content.metric_records["test-metrics"]["edge-accuracy"] = [0.5]
    if partition_id == 5:
        scale = arrays["feature_scale"].numpy()
        arrays["feature_scale"] = Array(np.full(scale.shape, 1e37, dtype=np.float32))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    if _impostor(context):
        return _impostor_client(context).evaluate(msg, context)
    if context.run_config.get("impostor"):
        return fedgkt.evaluate(msg, context)
    reply = fedgkt.evaluate(msg, context)
    if partition_id == 4:
        reply.content.metric_records["metrics"]["edge-accuracy"] = [0.5]
    return reply
