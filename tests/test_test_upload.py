"""The test upload fused into the training reply: a training instruction with
``test-features`` gets, besides the training upload, the test split's upload made
by the model just trained (``test-features``, ``test-metrics``): exactly what the
round's evaluation message would fetch, so that the node gets none. A node whose
training reply lacks it (an older client) is still sent one."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_message, set_task_identity
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from inprocess import InProcessGrid, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.node import load_node_partition
from flwr_fedgkt.records import (
    FEATURES_KEY,
    METRICS_KEY,
    TEST_FEATURES_KEY,
    TEST_METRICS_KEY,
    arrays_record,
    record_arrays,
)
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

RUN_CONFIG = {
    "dataset": "synthetic",
    "synthetic-samples-per-node": 40,
    "batch-size": 16,
    "seed": 3,
    "device": "cpu",
    "torch-threads": 1,  # results repeat bit for bit only with fixed threads
}
NODES = (101, 102)  # partitions 0 and 1: node keys "0" and "1"
PROFILE_PARTS = (
    "train_wait",
    "validate",
    "server_train",
    "server_logits",
    "score",
    "node_train",
    "node_extract",
    "node_encode",
    "node_handler",
)


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored():
    """torch-threads = 1 sets torch's threads process-wide: set them back after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- one node ---------------------------------------------------------------------------------
def _round_config(server_round: int, **extra: Any) -> ConfigRecord:
    return ConfigRecord(
        {
            "server-round": server_round,
            "feature-dtype": "int8",
            "feature-shape": "16x32x32",
            "compression": "none",
            "freeze-extractor": False,
            "held-features": "",
            **extra,
        }
    )


def _instruction(kind: str, node_id: int, server_round: int = 1, **extra: Any) -> Message:
    content = RecordDict({"config": _round_config(server_round, **extra)})
    return make_message(content, 0, node_id, kind)


def _arrays(reply: Message, record: str) -> dict[str, np.ndarray]:
    return record_arrays(reply.content.array_records[record])


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """The digest a node compares with ``held-*``: blake2b-128 over the wire bytes
    of the features, then their int8 scale and offset."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("features", "feature_scale", "feature_offset"):
        digest.update(np.ascontiguousarray(arrays[name]).view(np.uint8).data)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def one_node_round():
    """Round 1 on partition 0 twice from the same start: node A trains with
    ``test-features``; node B trains without, then gets the round's evaluation."""
    with pytest.MonkeyPatch.context() as patch:
        set_task_identity(patch)
        fused = node_context(101, 0, 2, RUN_CONFIG)
        plain = node_context(101, 0, 2, RUN_CONFIG)
        train_a = client_app.train(
            _instruction(MessageType.TRAIN, 101, **{"test-features": True}), fused
        )
        train_b = client_app.train(_instruction(MessageType.TRAIN, 101), plain)
        evaluate_b = client_app.evaluate(_instruction(MessageType.EVALUATE, 101), plain)
    return train_a, train_b, evaluate_b


def test_the_fused_test_upload_is_byte_for_byte_the_evaluation_upload(one_node_round) -> None:
    # Prepare
    train_a, train_b, evaluate_b = one_node_round
    test = load_node_partition(0, 2, RunConfig.from_mapping(RUN_CONFIG)).test
    # Execute
    fused = _arrays(train_a, TEST_FEATURES_KEY)
    unfused = _arrays(evaluate_b, FEATURES_KEY)
    # Assert: the same arrays, the same bytes (features, int8 scale and offset, ids, labels)
    assert sorted(fused) == ["feature_offset", "feature_scale", "features", "ids", "labels"]
    assert sorted(fused) == sorted(unfused)
    for name, array in fused.items():
        assert array.dtype == unfused[name].dtype, name
        assert np.array_equal(array, unfused[name]), name
    # they are the partition's test split
    assert np.array_equal(fused["ids"], test.ids.numpy())
    assert np.array_equal(fused["labels"], test.labels.numpy())
    assert fused["features"].shape == (len(test.ids), 16, 32, 32)
    # and the training uploads of the two nodes are the same too
    for name, array in _arrays(train_a, FEATURES_KEY).items():
        assert np.array_equal(array, _arrays(train_b, FEATURES_KEY)[name]), name


def test_the_fused_test_metrics_are_the_evaluation_metrics(one_node_round) -> None:
    # Prepare
    train_a, _, evaluate_b = one_node_round
    # Execute
    fused = train_a.content.metric_records[TEST_METRICS_KEY]
    unfused = evaluate_b.content.metric_records[METRICS_KEY]
    # Assert
    assert fused["edge-accuracy"] == unfused["edge-accuracy"]
    assert fused["edge-loss"] == unfused["edge-loss"]
    assert fused["num-examples"] == unfused["num-examples"] == 8
    assert 0.0 <= fused["edge-accuracy"] <= 1.0 and fused["edge-loss"] > 0.0


def test_a_training_reply_without_test_features_asked_carries_no_test_upload(
    one_node_round,
) -> None:
    # Prepare
    _, train_b, _ = one_node_round
    # Assert
    assert TEST_FEATURES_KEY not in train_b.content.array_records
    assert TEST_METRICS_KEY not in train_b.content.metric_records
    assert FEATURES_KEY in train_b.content.array_records


def test_test_features_the_server_holds_are_not_sent_again(one_node_round, task_identity) -> None:
    # Prepare: the server holds the test features this round's training makes
    # (held-test-features), not the training features (held-features is empty)
    _, _, evaluate_b = one_node_round
    held_test = _digest(_arrays(evaluate_b, FEATURES_KEY))
    context = node_context(101, 0, 2, RUN_CONFIG)
    extra: dict[str, Any] = {"test-features": True, "held-test-features": held_test}
    msg = _instruction(MessageType.TRAIN, 101, **extra)
    # Execute
    reply = client_app.train(msg, context)
    # Assert: the test upload is its ids only; the training upload is whole
    assert sorted(reply.content.array_records[TEST_FEATURES_KEY].keys()) == ["ids"]
    assert "features" in reply.content.array_records[FEATURES_KEY]
    assert reply.content.metric_records[TEST_METRICS_KEY]["num-examples"] == 8


# -- whole rounds -----------------------------------------------------------------------------
class CountingGrid(InProcessGrid):
    """An InProcessGrid that keeps every message it delivers and its reply:
    ``(node, message type, round, reply)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delivered: list[tuple[int, str, int, Message]] = []

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            (reply,) = super().send_and_receive([msg], timeout)
            config = msg.content.config_records.get("config", {})
            server_round = int(config.get("server-round", 0))
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.delivered.append((node, kind, server_round, reply))
            replies.append(reply)
        return replies

    def sent(self, kind: str) -> list[tuple[int, int]]:
        """``(node, round)`` of each message of type ``kind``."""
        return [(node, r) for node, k, r, _ in self.delivered if k == kind]


def _run(rounds: int, handlers=None) -> tuple[FedGKT, CountingGrid]:
    contexts = {node: node_context(node, i, 2, RUN_CONFIG) for i, node in enumerate(NODES)}
    grid = CountingGrid(contexts, handlers=handlers)
    config = RunConfig.from_mapping({**RUN_CONFIG, "server-epochs": 1})
    strategy = FedGKT(
        ServerTrainer.from_run_config(config, num_classes=10),
        server_epochs=1,
        feature_dtype="int8",
        seed=3,
    )
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds)
    return strategy, grid


def _stripped(msg: Message, context) -> Message:
    """A node that does not know ``test-features`` (an older client): its training
    reply carries no test upload."""
    reply = client_app.train(msg, context)
    del reply.content[TEST_FEATURES_KEY]
    del reply.content[TEST_METRICS_KEY]
    return reply


def _with_labels(record: str, label: int):
    """A node whose training reply's ``record`` (its training or its test upload)
    claims every label is ``label``."""

    def handle(msg: Message, context) -> Message:
        reply = client_app.train(msg, context)
        arrays = record_arrays(reply.content.array_records[record])
        arrays["labels"] = np.full_like(arrays["labels"], label)
        reply.content[record] = arrays_record(arrays)
        return reply

    return handle


@pytest.fixture(scope="module")
def fused_run():
    """Two rounds over two nodes with the built-in ClientApp."""
    with pytest.MonkeyPatch.context() as patch:
        set_task_identity(patch)
        return _run(2)


@pytest.fixture(scope="module")
def older_client_run():
    """The same, node 101 an older client that never sends the test upload."""
    with pytest.MonkeyPatch.context() as patch:
        set_task_identity(patch)
        return _run(2, handlers={(101, MessageType.TRAIN): _stripped})


def test_no_evaluation_message_when_the_training_replies_carry_the_test_uploads(
    fused_run,
) -> None:
    # Prepare
    strategy, grid = fused_run
    # Assert: two training messages a round, no evaluation message, both nodes scored
    assert sorted(grid.sent(MessageType.TRAIN)) == [(101, 1), (101, 2), (102, 1), (102, 2)]
    assert grid.sent(MessageType.EVALUATE) == []
    for record in strategy.engine.history:
        assert record["train_nodes"] == 2
        assert record["eval_nodes"] == 2
        assert record["eval_samples"] == 16  # 8 test samples per node
        assert record["accuracy"] is not None and record["edge_accuracy"] is not None
        assert record["rejected_replies"] == [] and record["failed_nodes"] == []
    # every training message asked for the test upload
    for node, kind, _, reply in grid.delivered:
        if kind == MessageType.TRAIN:
            assert TEST_FEATURES_KEY in reply.content.array_records, node


def test_a_node_without_the_test_upload_still_gets_its_evaluation_message(
    older_client_run,
) -> None:
    # Prepare
    strategy, grid = older_client_run
    # Assert: node 101 gets an evaluation message each round, node 102 none
    assert sorted(grid.sent(MessageType.EVALUATE)) == [(101, 1), (101, 2)]
    for record in strategy.engine.history:
        assert record["train_nodes"] == 2
        assert record["eval_nodes"] == 2
        assert sorted(record["node_accuracy"]) == ["0", "1"]
        assert record["rejected_replies"] == [] and record["failed_nodes"] == []


@pytest.mark.parametrize("run", ["fused_run", "older_client_run"])
def test_a_rounds_bytes_up_count_every_array_record_once(run, request) -> None:
    # Prepare
    strategy, grid = request.getfixturevalue(run)
    # Execute: by hand, every ArrayRecord of every reply the grid delivered, by round
    by_round: dict[int, int] = {}
    for _, _, server_round, reply in grid.delivered:
        total = sum(record.count_bytes() for record in reply.content.array_records.values())
        by_round[server_round] = by_round.get(server_round, 0) + int(total)
    # Assert
    assert [r["bytes_up"] for r in strategy.engine.history] == [by_round[1], by_round[2]]
    assert by_round.get(0, 0) == 0  # the key answers carry no arrays


def test_a_bad_test_upload_is_rejected_on_its_own(task_identity) -> None:
    # Prepare: node 102's test upload claims labels of class 99 (of 10)
    handlers = {(102, MessageType.TRAIN): _with_labels(TEST_FEATURES_KEY, 99)}
    # Execute
    strategy, grid = _run(1, handlers=handlers)
    # Assert: its test upload is rejected with the reason; its training upload is not
    (record,) = strategy.engine.history
    assert record["rejected_replies"] == [
        {
            "node_id": 102,
            "node_key": "1",
            "reason": "labels out of range: min 99, max 99, classes 10",
        }
    ]
    assert record["train_nodes"] == 2
    assert record["train_samples"] == 64  # 32 training samples per node
    assert "0" in record["node_accuracy"] and "1" not in record["node_accuracy"]


def test_a_bad_training_upload_leaves_the_test_upload_scored(task_identity) -> None:
    # Prepare: node 102's training upload claims labels of class 99 (of 10)
    handlers = {(102, MessageType.TRAIN): _with_labels(FEATURES_KEY, 99)}
    # Execute
    strategy, grid = _run(1, handlers=handlers)
    # Assert: its training upload is rejected, its test upload still scored
    (record,) = strategy.engine.history
    assert record["rejected_replies"] == [
        {
            "node_id": 102,
            "node_key": "1",
            "reason": "labels out of range: min 99, max 99, classes 10",
        }
    ]
    assert record["train_nodes"] == 1 and record["train_samples"] == 32
    assert record["eval_nodes"] == 2 and sorted(record["node_accuracy"]) == ["0", "1"]
    assert grid.sent(MessageType.EVALUATE) == []


def test_the_rounds_profile_holds_every_part(fused_run) -> None:
    # Prepare
    strategy, _ = fused_run
    # Assert
    for record in strategy.engine.history:
        profile = record["profile"]
        for part in PROFILE_PARTS:
            assert part in profile and profile[part] >= 0.0, (part, profile)
        # each node's handler time holds its training and its extraction
        assert profile["node_handler"] >= profile["node_train"] + profile["node_extract"]
        assert profile["node_train"] > 0.0 and profile["node_extract"] > 0.0
