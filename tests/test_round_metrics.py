"""A round's accuracy and edge accuracy are averages over samples, not over nodes.

Two nodes with unequal test splits (10 and 30 samples) score very differently,
so a per-node mean and a per-sample mean are far apart. The server accuracy is
checked against the server model's eval-mode predictions computed here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from flwr_fedgkt.records import FEATURES_KEY, META_KEY, METRICS_KEY, arrays_record
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.strategy import FedGKT

SHAPE = (16, 8, 8)
NUM_CLASSES = 10
SMALL, LARGE = 101, 202  # node ids
SIZES = {SMALL: 10, LARGE: 30}

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, *SHAPE, generator=gen)) * (
        1 + torch.rand(n, 1, 1, 1, generator=gen)
    )


def _eval_reply(
    node_id: int, server_round: int, features: torch.Tensor, labels: np.ndarray, metrics: dict
):
    n = len(labels)
    arrays = {
        "features": features.numpy().astype(np.float32),
        "labels": labels.astype(np.int64),
        "ids": np.arange(1000 * node_id, 1000 * node_id + n, dtype=np.int64),
    }
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord({"num-examples": n, **metrics}),
            META_KEY: ConfigRecord(
                {"server-round": server_round, "feature-dtype": "float32", "node-key": str(node_id)}
            ),
        }
    )
    return make_message(
        content, src_node_id=node_id, dst_node_id=0, message_type=MessageType.EVALUATE
    )


@torch.no_grad()
def _predictions(model: torch.nn.Module, features: torch.Tensor) -> np.ndarray:
    """The server model's eval-mode classes, computed here rather than by the trainer."""
    model.eval()
    return model(features.contiguous()).argmax(1).numpy()


def _labels_with_correct(predicted: np.ndarray, num_correct: int) -> np.ndarray:
    """Labels that agree with ``predicted`` on the first ``num_correct`` samples only."""
    labels = (predicted + 1) % NUM_CLASSES
    labels[:num_correct] = predicted[:num_correct]
    return labels


def _evaluate_round(strategy: FedGKT, replies: list) -> MetricRecord | None:
    """Round 1 with no training replies, then the given evaluation replies."""
    grid = FakeGrid(list(SIZES))
    strategy.configure_train(1, None, ConfigRecord(), grid)
    strategy.aggregate_train(1, [])
    strategy.configure_evaluate(1, None, ConfigRecord(), grid)
    return strategy.aggregate_evaluate(1, replies)


def _strategy(records: list) -> FedGKT:
    trainer = ServerTrainer(NUM_CLASSES, batch_size=8, seed=0, device="cpu")
    return FedGKT(
        trainer, feature_dtype="float32", feature_shape=SHAPE, on_round_end=records.append
    )


def test_server_accuracy_is_weighted_by_test_samples(task_identity) -> None:
    # Prepare: the server model classifies all 10 samples of the small node right,
    # only 6 of the 30 of the large one (labels set from its predictions)
    records: list = []
    strategy = _strategy(records)
    features = {node: _features(n, node) for node, n in SIZES.items()}
    correct = {SMALL: 10, LARGE: 6}
    replies = [
        _eval_reply(
            node,
            1,
            features[node],
            _labels_with_correct(
                _predictions(strategy.trainer.model, features[node]), correct[node]
            ),
            {},
        )
        for node in SIZES
    ]
    # Execute
    metrics = _evaluate_round(strategy, replies)
    # Assert: 16 of 40 samples (a mean over nodes would be 0.6)
    record = records[-1]
    assert record is strategy.history[-1]
    assert record["eval_samples"] == 40
    assert record["accuracy"] == pytest.approx(16 / 40)
    assert metrics is not None and metrics["accuracy"] == pytest.approx(16 / 40)


def test_edge_accuracy_is_weighted_by_test_samples(task_identity) -> None:
    # Prepare: the small node's edge model is always right, the large node's never
    records: list = []
    strategy = _strategy(records)
    edge = {SMALL: 1.0, LARGE: 0.0}
    replies = [
        _eval_reply(
            node, 1, _features(n, node), np.zeros(n, np.int64), {"edge_accuracy": edge[node]}
        )
        for node, n in SIZES.items()
    ]
    # Execute
    metrics = _evaluate_round(strategy, replies)
    # Assert: 10 of 40 samples (a mean over nodes would be 0.5)
    assert records[-1]["edge_accuracy"] == pytest.approx(10 / 40)
    assert metrics is not None and metrics["edge-accuracy"] == pytest.approx(10 / 40)


def test_edge_accuracy_counts_only_the_samples_of_nodes_that_report_it(task_identity) -> None:
    # Prepare: a node that reports no edge accuracy does not dilute the mean
    records: list = []
    strategy = _strategy(records)
    replies = [
        _eval_reply(SMALL, 1, _features(10, 1), np.zeros(10, np.int64), {"edge_accuracy": 0.9}),
        _eval_reply(LARGE, 1, _features(30, 2), np.zeros(30, np.int64), {}),
    ]
    # Execute
    _evaluate_round(strategy, replies)
    # Assert
    assert records[-1]["edge_accuracy"] == pytest.approx(0.9)
    assert records[-1]["eval_samples"] == 40
