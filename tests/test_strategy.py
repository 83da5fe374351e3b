import hashlib

import numpy as np
import pytest
import torch
from conftest import make_message
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from flwr_fedgkt.features import encode_features
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


class FakeGrid:
    """Only node discovery: the strategy samples nodes through the Grid."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _strategy(**kwargs) -> FedGKT:
    trainer = ServerTrainer(10, batch_size=8, seed=0, device="cpu")
    return FedGKT(trainer, server_epochs=1, feature_dtype="float32", feature_shape=SHAPE, **kwargs)


def _reply(node_id: int, server_round: int, sample_ids: np.ndarray, seed: int = 0, **overrides):
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
            META_KEY: ConfigRecord({"server-round": server_round, "feature-dtype": "float32"}),
        }
    )
    return make_message(content, src_node_id=node_id, dst_node_id=0, message_type=MessageType.TRAIN)


def _model_hash(strategy: FedGKT) -> str:
    digest = hashlib.sha256()
    for tensor in strategy.trainer.model.state_dict().values():
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


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


@pytest.mark.parametrize(
    "bad",
    [
        {"features": np.full((4, *SHAPE), np.nan, dtype=np.float32)},
        {"labels": np.array([0, 1, 2, 99])},
        {"ids": np.array([1, 1, 2, 3])},
    ],
)
def test_a_malformed_reply_touches_neither_store_nor_model(task_identity, bad) -> None:
    # Prepare
    strategy = _strategy(min_available_nodes=1, min_train_nodes=1)
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1]))
    before = _model_hash(strategy)
    # Execute
    _, metrics = strategy.aggregate_train(1, [_reply(7, 1, np.arange(4), **bad)])
    # Assert
    assert _model_hash(strategy) == before
    assert 7 not in strategy.store
    assert strategy._round["rejected_replies"][0]["node_id"] == 7
    assert metrics is not None and metrics["replies"] == 0


def test_the_round_goes_on_with_the_well_behaved_nodes(task_identity) -> None:
    strategy = _strategy(min_available_nodes=1, min_train_nodes=1)
    strategy.configure_train(2, None, ConfigRecord(), FakeGrid([1]))
    good = _reply(1, 2, np.arange(16))
    stale = _reply(2, 1, np.arange(16, 32))  # a reply to another round
    _, metrics = strategy.aggregate_train(2, [good, stale])
    assert metrics["replies"] == 1
    assert 1 in strategy.store and 2 not in strategy.store
    assert "round 1" in strategy._round["rejected_replies"][0]["reason"]
    assert 1 in strategy.server_logits
