"""Simulated stragglers: which nodes are slow, and how long a slow node waits."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from inprocess import node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.records import CONFIG_KEY
from flwr_fedgkt.settings import ConfigError, RunConfig
from flwr_fedgkt.stragglers import node_slowdown, straggle

RUN_CONFIG = {
    "dataset": "synthetic",
    "synthetic-samples-per-node": 40,
    "batch-size": 16,
    "seed": 3,
    "slow-partitions": "0, 2",
    "slowdown": 4.0,
}


def test_the_run_config_names_the_slow_partitions_and_a_node_config_overrides() -> None:
    # Prepare
    config = RunConfig.from_mapping(RUN_CONFIG)
    # Execute / Assert: partitions 0 and 2 are slow, 1 is not; a node's own
    # slowdown wins over both
    assert config.slow_partition_ids == frozenset({0, 2})
    assert node_slowdown(config, {"partition-id": 0}) == 4.0
    assert node_slowdown(config, {"partition-id": 1}) == 1.0
    assert node_slowdown(config, {"partition-id": 2, "slowdown": 1.5}) == 1.5
    assert node_slowdown(config, {"partition-id": 1, "slowdown": 2}) == 2.0
    assert node_slowdown(RunConfig.from_mapping({}), {"partition-id": 0}) == 1.0


@pytest.mark.parametrize(
    ("key", "value"), [("slow-partitions", "0,x"), ("slowdown", 0.5), ("slowdown", 1e9)]
)
def test_bad_straggler_settings_are_named(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: value})


@pytest.mark.parametrize("value", ["fast", 0.5, float("nan")])
def test_a_bad_node_config_slowdown_is_named(value: object) -> None:
    with pytest.raises(ValueError, match="slowdown"):
        node_slowdown(RunConfig.from_mapping({}), {"partition-id": 0, "slowdown": value})


def test_a_slow_node_waits_slowdown_minus_one_times_its_training() -> None:
    # Prepare
    waits: list[float] = []
    # Execute
    waited = straggle(4.0, 0.5, sleep=waits.append)
    not_slow = straggle(1.0, 0.5, sleep=waits.append)
    # Assert: (4 - 1) x 0.5 s, once; a node that is not slow does not wait
    assert waited == pytest.approx(1.5) and waits == [pytest.approx(1.5)]
    assert not_slow == 0.0


@pytest.mark.parametrize(("partition", "expected"), [(0, 3.0), (1, 0.0)])
def test_the_built_in_client_app_holds_a_slow_nodes_reply_back(
    task_identity, monkeypatch, partition: int, expected: float
) -> None:
    # Prepare: the built-in ClientApp's train handler on a slow and a fast node
    waits: list[float] = []
    monkeypatch.setattr("flwr_fedgkt.stragglers.time.sleep", waits.append)
    context = node_context(10 + partition, partition, 3, RUN_CONFIG)
    config = ConfigRecord({"server-round": 1, "feature-dtype": "int8", "client-epochs": 1})
    msg = Message(
        content=RecordDict({CONFIG_KEY: config}),
        dst_node_id=10 + partition,
        message_type=MessageType.TRAIN,
    )
    # Execute
    reply = client_app.train(msg, context)
    # Assert: the slow node waited 3 x the training seconds its reply reports
    trained = float(reply.content.metric_records["metrics"]["edge-train-seconds"])
    assert trained > 0
    assert sum(waits) == pytest.approx(expected * trained)
