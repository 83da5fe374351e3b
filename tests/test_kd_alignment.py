"""The knowledge that travels between server and edge lands on the right samples.

Server logits must be the server model's eval-mode predictions, each row paired
with the sample id whose features produced it, on the way out of the strategy and
on the edge's lookup by id; and the server model must learn from the edge logits
(its loss carries the KD term). Every expectation here is computed independently
of the code under test, from the features the nodes uploaded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FakeGrid, make_message
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from flwr_fedgkt.codec import EncodedFeatures, FeaturePayload
from flwr_fedgkt.edge import LogitTable
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    arrays_record,
    record_arrays,
)
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.strategy import FedGKT

SHAPE = (16, 8, 8)
NUM_CLASSES = 10
# sample ids neither sorted nor equal to their positions, as a node may number them
IDS_A = np.array([17, 3, 42, 8, 25, 11, 30, 5, 60, 1], dtype=np.int64)
IDS_B = np.array([99, 77, 88, 71, 93, 80], dtype=np.int64)

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n: int, seed: int) -> torch.Tensor:
    """Post-ReLU-like features whose samples differ clearly from one another
    (each sample has its own magnitude)."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = torch.linspace(0.5, 3.0, n)[torch.randperm(n, generator=gen)]
    return torch.relu(torch.randn(n, *SHAPE, generator=gen)) * magnitude.view(-1, 1, 1, 1)


def _train_reply(node_id: int, server_round: int, ids: np.ndarray, features: torch.Tensor):
    n = len(ids)
    gen = torch.Generator().manual_seed(node_id)
    arrays = {
        "features": features.numpy().astype(np.float32),
        "logits": torch.randn(n, NUM_CLASSES, generator=gen).numpy(),
        "labels": (ids % NUM_CLASSES).astype(np.int64),
        "ids": ids,
    }
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord({"num-examples": n}),
            META_KEY: ConfigRecord(
                {"server-round": server_round, "feature-dtype": "float32", "node-key": str(node_id)}
            ),
        }
    )
    return make_message(content, src_node_id=node_id, dst_node_id=0, message_type=MessageType.TRAIN)


@torch.no_grad()
def _eval_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode logits, computed here rather than by the trainer."""
    was_training = model.training
    model.eval()
    out = model(features.contiguous()).float()
    model.train(was_training)
    return out


def _assert_rows_distinguishable(logits: torch.Tensor, tolerance: float) -> None:
    """Guard: two samples' logits differ by far more than the comparison's
    tolerance, so a row paired with the wrong id cannot pass."""
    distance = torch.cdist(logits, logits)
    distance.fill_diagonal_(float("inf"))
    assert float(distance.min()) > 100 * tolerance, "samples' logits too alike to tell apart"


def _one_round(strategy: FedGKT, grid: FakeGrid, uploads: dict[int, tuple]) -> dict:
    """Round 1 with the given uploads, then round 2's train messages by node id."""
    strategy.configure_train(1, None, ConfigRecord(), grid)
    replies = [_train_reply(node, 1, ids, feats) for node, (ids, feats) in uploads.items()]
    strategy.aggregate_train(1, replies)
    return {
        m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)
    }


def test_each_server_logit_row_is_the_eval_mode_prediction_on_that_ids_features(
    task_identity,
) -> None:
    # Prepare: two nodes upload features under unsorted, non-positional ids
    trainer = ServerTrainer(NUM_CLASSES, batch_size=8, seed=0, device="cpu", precision="float32")
    strategy = FedGKT(trainer, feature_dtype="float32", feature_shape=SHAPE)
    uploads = {101: (IDS_A, _features(len(IDS_A), 1)), 202: (IDS_B, _features(len(IDS_B), 2))}
    # Execute: one round of server training, then the next round's messages
    messages = _one_round(strategy, FakeGrid([101, 202]), uploads)
    # Assert: every (id, row) sent is the trained model's eval-mode output on the
    # features that node uploaded under that id
    tolerance = 1e-3
    for node, (ids, features) in uploads.items():
        sent = record_arrays(messages[node].content.array_records[LOGITS_KEY])
        expected = _eval_logits(trainer.model, features)
        _assert_rows_distinguishable(expected, tolerance)
        assert sorted(sent["ids"].tolist()) == sorted(ids.tolist())
        row_of = {int(i): r for r, i in enumerate(ids)}
        for sample_id, row in zip(sent["ids"].tolist(), sent["logits"], strict=True):
            want = expected[row_of[sample_id]]
            assert torch.allclose(torch.from_numpy(row), want, rtol=1e-4, atol=tolerance), (
                f"node {node}, sample id {sample_id}: sent {row[:3]}..., "
                f"its eval-mode prediction is {want[:3].tolist()}..."
            )


def test_the_edge_finds_each_samples_server_logits_by_id_after_the_wire(task_identity) -> None:
    # Prepare: as above, one round of server training with unordered ids
    trainer = ServerTrainer(NUM_CLASSES, batch_size=8, seed=0, device="cpu", precision="float32")
    strategy = FedGKT(trainer, feature_dtype="float32", feature_shape=SHAPE)
    ids, features = IDS_A, _features(len(IDS_A), 1)
    uploads = {101: (ids, features), 202: (IDS_B, _features(len(IDS_B), 2))}
    messages = _one_round(strategy, FakeGrid([101, 202]), uploads)
    # Execute: the edge builds its KD table from the message and looks its samples
    # up in yet another order (as a shuffled training batch does)
    sent = record_arrays(messages[101].content.array_records[LOGITS_KEY])
    table = LogitTable(sent["ids"], sent["logits"])
    order = torch.tensor([4, 9, 0, 7, 2, 5, 1, 8, 3, 6])
    targets, found = table.lookup(torch.from_numpy(ids)[order])
    # Assert: each sample's KD target is the prediction on its own features
    assert bool(found.all())
    expected = _eval_logits(trainer.model, features)[order]
    _assert_rows_distinguishable(expected, 1e-3)
    assert torch.allclose(targets, expected, rtol=1e-4, atol=1e-3), (
        "KD targets differ from the predictions on the samples' own features by up to "
        f"{float((targets - expected).abs().max()):.3g}"
    )


def test_logit_table_pairs_every_id_with_its_own_row_whatever_the_order() -> None:
    # Prepare: row r of the logits encodes its id in every column
    ids = np.array([17, 3, 42, 8, 25], dtype=np.int64)
    logits = np.repeat(ids.astype(np.float32)[:, None], 4, axis=1) + np.arange(4, dtype=np.float32)
    table = LogitTable(ids, logits)
    # Execute
    query = torch.tensor([8, 42, 17, 25, 3, 8])
    targets, found = table.lookup(query)
    # Assert
    assert found.tolist() == [True] * 6
    assert torch.equal(targets[:, 0], query.float())
    assert torch.equal(targets[:, 3], query.float() + 3)


def _train_one_step(trainer: ServerTrainer) -> None:
    """One server training step (it moves the BatchNorm running statistics)."""
    labels = np.arange(8) % NUM_CLASSES
    store = FeatureStore()
    store.put("a", _payload(_features(8, 5), labels, _one_hot((labels + 3) % NUM_CLASSES)), 1)
    trainer.train(store, epochs=1)


def test_predict_uses_running_statistics_not_the_batchs_own() -> None:
    # Prepare: a trained model left in train mode, as training leaves it
    trainer = ServerTrainer(NUM_CLASSES, batch_size=8, seed=0, device="cpu", precision="float32")
    _train_one_step(trainer)
    trainer.model.train()
    features = _features(6, 7)
    buffers = [b.clone() for b in trainer.model.buffers()]
    expected = _eval_logits(trainer.model, features)
    # the check below can tell the two modes apart
    with torch.no_grad():
        batch_stats = copy.deepcopy(trainer.model).train()(features.contiguous())
    assert float((batch_stats - expected).abs().max()) > 1.0
    # Execute
    whole = trainer.predict(features)
    alone = torch.cat([trainer.predict(features[i : i + 1]) for i in range(len(features))])
    # Assert: eval-mode outputs, independent of the batch, statistics untouched
    for name, got in (("a batch", whole), ("one sample at a time", alone)):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3), (
            f"predict on {name} is off the eval-mode logits by up to "
            f"{float((got - expected).abs().max()):.3g}"
        )
    for before, after in zip(buffers, trainer.model.buffers(), strict=True):
        assert torch.equal(before, after), "predict changed the BatchNorm statistics"


def _one_hot(classes: np.ndarray, magnitude: float = 8.0) -> np.ndarray:
    out = np.zeros((len(classes), NUM_CLASSES), dtype=np.float32)
    out[np.arange(len(classes)), classes] = magnitude
    return out


def _payload(features: torch.Tensor, labels: np.ndarray, edge_logits: np.ndarray) -> FeaturePayload:
    n = len(labels)
    return FeaturePayload(
        EncodedFeatures("float32", features.numpy().astype(np.float32)),
        edge_logits.astype(np.float32),
        labels.astype(np.int64),
        np.arange(100, 100 + n, dtype=np.int64),
    )


def _kd_by_hand(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, mean over samples."""
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_p_teacher = torch.log_softmax(teacher / temperature, dim=1)
    log_p_student = torch.log_softmax(logits / temperature, dim=1)
    kl = (p_teacher * (log_p_teacher - log_p_student)).sum(dim=1).mean()
    return kl * temperature**2


def _step_by_hand(
    model: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    alpha: float,
    lr: float,
) -> float:
    """One Adam step (the server's optimizer settings) on ``CE + alpha * KD``;
    returns the loss before the step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=5e-4)
    model.train()
    logits = model(features.contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits, labels)
    if alpha:
        loss = loss + alpha * _kd_by_hand(logits, teacher, temperature)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return float(
        sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters(), strict=True))
        ** 0.5
    )


def test_server_training_distills_from_the_edge_logits() -> None:
    # Prepare: one batch whose edge logits confidently name another class than
    # the label, so the KD term pulls against the cross entropy
    temperature, alpha, lr = 3.0, 1.0, 0.01
    trainer = ServerTrainer(
        NUM_CLASSES,
        lr=lr,
        temperature=temperature,
        alpha=alpha,
        batch_size=8,
        seed=0,
        device="cpu",
        precision="float32",
    )
    features = _features(8, 3)
    labels = np.arange(8) % NUM_CLASSES
    edge_logits = _one_hot((labels + 3) % NUM_CLASSES)
    store = FeatureStore()
    store.put("a", _payload(features, labels, edge_logits), 1)
    with_kd, without_kd = copy.deepcopy(trainer.model), copy.deepcopy(trainer.model)
    labels_t, teacher = torch.from_numpy(labels), torch.from_numpy(edge_logits)
    # Execute: the trainer's step and two steps by hand from the same state
    result = trainer.train(store, epochs=1)
    loss_kd = _step_by_hand(with_kd, features, labels_t, teacher, temperature, alpha, lr)
    loss_ce = _step_by_hand(without_kd, features, labels_t, teacher, temperature, 0.0, lr)
    # Assert: the KD term is large here, the trainer's loss includes it, and its
    # step is the CE + KD step, not the cross-entropy-only one
    assert loss_kd - loss_ce > 1.0
    assert result.samples == 8
    assert abs(result.loss - loss_kd) <= 1e-3 * loss_kd, (
        f"server loss {result.loss:.4f}; CE + KD by hand {loss_kd:.4f}, CE alone {loss_ce:.4f}"
    )
    to_kd, to_ce = _distance(trainer.model, with_kd), _distance(trainer.model, without_kd)
    assert to_kd < 0.1 * to_ce, (
        f"the server's step lies {to_kd:.3g} from the CE + KD step, {to_ce:.3g} from the CE one"
    )
