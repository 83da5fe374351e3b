import re

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from inprocess import model_hash

from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    arrays_record,
    record_arrays,
)
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.strategy import FedGKT

SHAPE = (16, 8, 8)


def _strategy(**kwargs) -> FedGKT:
    trainer = ServerTrainer(10, batch_size=8, seed=0, device="cpu")
    return FedGKT(trainer, server_epochs=1, feature_dtype="float32", feature_shape=SHAPE, **kwargs)


def _reply(
    node_id: int,
    server_round: int,
    sample_ids: np.ndarray,
    seed: int = 0,
    key: str | None = None,
    **overrides,
):
    gen = torch.Generator().manual_seed(seed)
    n = len(sample_ids)
    arrays = encode_features(torch.relu(torch.randn(n, *SHAPE, generator=gen)), "float32").arrays()
    arrays.update(
        logits=torch.randn(n, 10, generator=gen).numpy(),
        labels=(sample_ids % 10).astype(np.int64),
        ids=sample_ids.astype(np.int64),
    )
    arrays.update(overrides)
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord(
                {"num-examples": n, "train_loss": 1.0, "train_accuracy": 0.5}
            ),
            META_KEY: ConfigRecord(
                {
                    "server-round": server_round,
                    "feature-dtype": "float32",
                    "node-key": str(node_id) if key is None else key,
                }
            ),
        }
    )
    return make_message(content, src_node_id=node_id, dst_node_id=0, message_type=MessageType.TRAIN)


def test_each_node_gets_its_own_server_logits(task_identity) -> None:
    # Prepare: round 1 with two nodes
    strategy = _strategy(min_available_nodes=2)
    grid = FakeGrid([101, 202])
    first = list(strategy.configure_train(1, None, ConfigRecord(), grid))
    assert all(LOGITS_KEY not in m.content.array_records for m in first)
    strategy.aggregate_train(
        1, [_reply(101, 1, np.arange(0, 12)), _reply(202, 1, np.arange(50, 70), seed=1)]
    )
    # Execute
    second = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)
    }
    # Assert
    ids_101 = record_arrays(second[101].content.array_records[LOGITS_KEY])["ids"]
    ids_202 = record_arrays(second[202].content.array_records[LOGITS_KEY])["ids"]
    assert sorted(ids_101.tolist()) == list(range(0, 12))
    assert sorted(ids_202.tolist()) == list(range(50, 70))
    assert second[101].content is not second[202].content
    assert second[101].content.config_records["config"]["server-round"] == 2


def _drop(key: str, record: str):
    def mutate(msg):
        getattr(msg.content, record).pop(key)
        return msg

    return mutate


def _set_meta(key: str, value):
    def mutate(msg):
        msg.content.config_records[META_KEY][key] = value
        return msg

    return mutate


BAD_REPLIES = {
    "wrong feature shape": ({"features": np.zeros((4, 16, 4, 4), np.float32)}, None, "shape"),
    "wrong dtype": ({"features": np.zeros((4, *SHAPE), np.float64)}, None, "dtype"),
    "NaN in features": ({"features": np.full((4, *SHAPE), np.nan, np.float32)}, None, "NaN"),
    "Inf in logits": ({"logits": np.full((4, 10), np.inf, np.float32)}, None, "NaN or Inf"),
    "labels out of range": ({"labels": np.array([0, 1, 2, 99])}, None, "out of range"),
    "lengths disagree": ({"labels": np.array([0, 1, 2])}, None, "labels \\(3,\\) must be"),
    "duplicate ids": ({"ids": np.array([1, 1, 2, 3])}, None, "duplicate"),
    "negative ids": ({"ids": np.array([-1, 0, 2, 3])}, None, "negative"),
    "missing features record": ({}, _drop(FEATURES_KEY, "array_records"), "missing ArrayRecord"),
    "missing metrics record": ({}, _drop(METRICS_KEY, "metric_records"), "missing MetricRecord"),
    "missing meta record": ({}, _drop(META_KEY, "config_records"), "missing ConfigRecord"),
    "reply to the wrong round": ({}, _set_meta("server-round", 3), "round 3"),
    "unexpected feature dtype": ({}, _set_meta("feature-dtype", "int8"), "feature dtype"),
    "reply too large": ({}, None, "max-reply-bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_malformed_reply_touches_neither_store_nor_model(task_identity, case) -> None:
    # Prepare: two identical strategies that saw the same good round 1
    overrides, mutate, reason = BAD_REPLIES[case]
    limit = 10_000 if case == "reply too large" else 0
    strategies = [
        _strategy(min_available_nodes=1, min_train_nodes=1, max_reply_bytes=limit) for _ in range(2)
    ]
    for strategy in strategies:
        strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1]))
        strategy.aggregate_train(1, [_reply(1, 1, np.arange(50, 52))])
        strategy.configure_train(2, None, ConfigRecord(), FakeGrid([1]))
    bad = _reply(7, 2, np.arange(4), **overrides)
    if mutate is not None:
        bad = mutate(bad)
    # Execute: round 2 brings one strategy the bad reply, the other nothing at all
    _, metrics = strategies[0].aggregate_train(2, [bad])
    strategies[1].aggregate_train(2, [])
    # Assert: the bad reply left exactly the state that no reply leaves
    with_bad, without = strategies
    assert model_hash(with_bad.trainer.model) == model_hash(without.trainer.model)
    assert with_bad.store.nodes() == without.store.nodes() == ["1"]
    assert with_bad.store.num_samples == 2
    rejected = with_bad.engine.current.rejected_replies
    assert [r["node_id"] for r in rejected] == [7]
    assert re.search(reason, rejected[0]["reason"]), rejected[0]["reason"]
    assert metrics is not None and metrics["replies"] == 0


def test_the_round_goes_on_with_the_well_behaved_nodes(task_identity) -> None:
    strategy = _strategy(min_available_nodes=1, min_train_nodes=1)
    strategy.configure_train(2, None, ConfigRecord(), FakeGrid([1]))
    good = _reply(1, 2, np.arange(16))
    stale = _reply(2, 1, np.arange(16, 32))  # a reply to another round
    _, metrics = strategy.aggregate_train(2, [good, stale])
    assert metrics["replies"] == 1
    assert "1" in strategy.store and "2" not in strategy.store
    assert "round 1" in strategy.engine.current.rejected_replies[0]["reason"]
    assert "1" in strategy.engine.server_logits


def test_stale_features_train_until_max_staleness_and_logits_still_reach_the_node(
    task_identity,
) -> None:
    # Prepare: two nodes in round 1, then only node 1 answers
    strategy = _strategy(min_available_nodes=1, min_train_nodes=1, max_staleness=1)
    both, only_1 = FakeGrid([1, 2]), FakeGrid([1])
    strategy.configure_train(1, None, ConfigRecord(), both)
    strategy.aggregate_train(
        1, [_reply(1, 1, np.arange(0, 8)), _reply(2, 1, np.arange(8, 16), seed=1)]
    )
    # Execute / Assert: round 2, node 2 is one round stale and still trains
    strategy.configure_train(2, None, ConfigRecord(), only_1)
    strategy.aggregate_train(2, [_reply(1, 2, np.arange(0, 8))])
    assert strategy.store.nodes() == ["1", "2"]
    assert strategy.engine.current.stored_samples == 16
    # round 3: node 2 is two rounds stale, beyond max-staleness, and is dropped
    strategy.configure_train(3, None, ConfigRecord(), only_1)
    strategy.aggregate_train(3, [_reply(1, 3, np.arange(0, 8))])
    assert strategy.store.nodes() == ["1"]
    assert strategy.engine.current.stored_samples == 8
    # round 4: node 2 is sampled again and gets its latest server logits
    messages = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(4, None, ConfigRecord(), both)
    }
    ids = record_arrays(messages[2].content.array_records[LOGITS_KEY])["ids"]
    assert sorted(ids.tolist()) == list(range(8, 16))
