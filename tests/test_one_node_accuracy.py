"""One hostile node beside three honest ones, in process, through the real strategy
and the built-in ClientApp functions (synthetic data, four partitions, three
rounds): for each way a node can misuse what the server accepts, the honest nodes
are never rejected, and the server's accuracy stays within 2 points of the same
seeded run without the hostile node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from inprocess import InProcessGrid, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.client import FedGKTClient, key_reply
from flwr_fedgkt.node import edge_model_factory, load_node_partition, partition_sample_ids
from flwr_fedgkt.records import FEATURES_KEY, TEST_FEATURES_KEY
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

ROUNDS = 3
HOSTILE = 40  # the hostile node's id; partition 3
HONEST_IDS = (10, 11, 12)  # partitions 0, 1, 2


def _config(state_dir: Path) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 60,
        "batch-size": 16,
        "server-epochs": 1,
        "seed": 11,
        "feature-dtype": "int8",
        "client-state-dir": str(state_dir),
    }


class Hostile:
    """The hostile node's handlers, by case; ``seen`` keeps node 11's (partition
    1's) replies, for the copies."""

    def __init__(self, case: str, config: dict, context: Context) -> None:
        self.case = case
        self.run_config = RunConfig.from_mapping({**config, "device": "cpu"})
        self.context = context
        self.seen: list[Message] = []

    def watch(self, msg: Message, context: Context) -> Message:
        """Node 11's training, kept for the copy cases."""
        reply = client_app.train(msg, context)
        self.seen.append(reply)
        return reply

    def query(self, msg: Message, context: Context) -> Message:
        key = "1" if self.case == "takeover" else "3"
        return key_reply(msg, key, context)

    def _client(self, partition_id: int, key: str) -> FedGKTClient:
        data = load_node_partition(partition_id, 4, self.run_config)
        model = edge_model_factory(self.run_config, 10, 3)
        return FedGKTClient(model, data.train, data.test, node_key=key, batch_size=16)

    def train(self, msg: Message, context: Context) -> Message:
        if self.case == "takeover":
            return self._client(3, "1").train(msg, context)
        if self.case == "squat":
            return self._client(1, "3").train(msg, context)
        reply = client_app.train(msg, context)
        arrays = reply.content.array_records[FEATURES_KEY]
        if self.case == "made-up" and TEST_FEATURES_KEY in reply.content.array_records:
            _make_up(reply.content.array_records[TEST_FEATURES_KEY])  # its test upload
        if self.case == "extreme":
            scale = arrays["feature_scale"].numpy()
            arrays["feature_scale"] = Array(np.full_like(scale, 9000 / 255))
        elif self.case == "near-copy" and self.seen:
            copied = self.seen[-1].content.array_records[FEATURES_KEY]
            for name in ("features", "feature_scale", "feature_offset"):
                arrays[name] = Array(copied[name].numpy().copy())
            count = len(copied["ids"].numpy())
            own = arrays["ids"].numpy()[:count]
            if len(own) == count:  # the copy under the hostile node's own ids
                for name in ("ids", "labels", "logits"):
                    arrays[name] = Array(arrays[name].numpy()[:count].copy())
                reply.content.metric_records["metrics"]["num-examples"] = count
        elif self.case == "bomb":
            frame = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 26))
            arrays["features"] = Array(np.frombuffer(frame, dtype=np.uint8).copy())
        return reply

    def evaluate(self, msg: Message, context: Context) -> Message:
        if self.case == "takeover":
            return self._client(3, "1").evaluate(msg, context)
        reply = client_app.evaluate(msg, context)
        if self.case == "made-up":
            _make_up(reply.content.array_records[FEATURES_KEY])
        return reply


def _make_up(arrays) -> None:
    """Test samples no partition holds: made-up ids, every label 0."""
    arrays["ids"] = Array(arrays["ids"].numpy() + 1_000_000)
    arrays["labels"] = Array(np.zeros_like(arrays["labels"].numpy()))


def _run(tmp_path: Path, case: str | None) -> FedGKT:
    """Three rounds of the three honest nodes, and the hostile node unless None."""
    config = _config(tmp_path / f"state-{case}")
    run_config = RunConfig.from_mapping({**config, "device": "cpu"})
    strategy = FedGKT(
        ServerTrainer.from_run_config(run_config, num_classes=10),
        server_epochs=1,
        feature_dtype="int8",
        global_sample_ids=True,
        sample_ids=partition_sample_ids(run_config, 4),
        min_available_nodes=3,
        min_train_nodes=3,
        min_evaluate_nodes=3,
        seed=11,
    )
    contexts = {n: node_context(n, i, 4, config) for i, n in enumerate(HONEST_IDS)}
    handlers: dict[tuple[int, str], Callable] = {}
    if case is not None:
        hostile_config = {**config, "client-state-dir": str(tmp_path / f"hostile-{case}")}
        contexts[HOSTILE] = node_context(HOSTILE, 3, 4, hostile_config)
        hostile = Hostile(case, config, contexts[HOSTILE])
        handlers = {
            (HOSTILE, MessageType.QUERY): hostile.query,
            (HOSTILE, MessageType.TRAIN): hostile.train,
            (HOSTILE, MessageType.EVALUATE): hostile.evaluate,
            (11, MessageType.TRAIN): hostile.watch,
        }
    strategy.start(
        grid=InProcessGrid(dict(sorted(contexts.items())), handlers=handlers),
        initial_arrays=ArrayRecord(),
        num_rounds=ROUNDS,
    )
    return strategy


@pytest.fixture(scope="module")
def without_it(tmp_path_factory) -> list[dict]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        from conftest import set_task_identity

        set_task_identity(monkeypatch)
        return _run(tmp_path_factory.mktemp("honest"), None).history


CASES = ["takeover", "squat", "made-up", "near-copy", "extreme", "bomb"]


def _honest_accuracy(record: dict) -> float:
    """The server's accuracy on the honest nodes' test features (mean over them)."""
    return float(np.mean([record["node_accuracy"][key] for key in ("0", "1", "2")]))


@pytest.mark.parametrize("case", CASES)
def test_one_hostile_node_costs_the_honest_nodes_at_most_2_points(
    task_identity, tmp_path, without_it, case
) -> None:
    # Prepare / Execute: the same seeded run with the hostile node
    history = _run(tmp_path, case).history
    # Assert: the hostile node is rejected in every round, nobody else ever; the
    # honest nodes trained and were scored in every round ...
    rejected = [x for r in history for x in r["rejected_replies"]]
    assert {x["node_id"] for x in rejected} == {HOSTILE}, rejected
    assert {r["round"] for r in history if r["rejected_replies"]} == {1, 2, 3}
    for record in history:
        assert record["train_nodes"] >= 3 and record["eval_nodes"] >= 3
        assert {"0", "1", "2"} <= set(record["node_accuracy"])
    # ... and the server's accuracy on their test features is at most 2 points
    # below the run without the hostile node (a hostile node that trains honestly
    # on its own partition in some cases adds data, which may only help)
    assert _honest_accuracy(history[-1]) >= _honest_accuracy(without_it[-1]) - 0.02
