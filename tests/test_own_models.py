"""FedGKT with a server model of the user's own and features of any fixed shape: a
1-D feature vector from an MLP travels in every wire dtype, trains the server
model and gets server logits back; the class count comes from the model."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from torch import nn

from flwr_fedgkt import FEATURE_DTYPES, FedGKT, ServerTrainer, decode_features, encode_features
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    arrays_record,
    record_arrays,
)
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

WIDTH, CLASSES = 24, 5


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, CLASSES)
    )


def _reply(node_id: int, ids: np.ndarray, dtype: str, width: int = WIDTH):
    gen = torch.Generator().manual_seed(node_id)
    features = torch.relu(torch.randn(len(ids), width, generator=gen)) + torch.arange(width) / 10
    arrays = encode_features(features, dtype).arrays()
    arrays.update(
        logits=torch.randn(len(ids), CLASSES, generator=gen).numpy(),
        labels=(ids % CLASSES).astype(np.int64),
        ids=ids.astype(np.int64),
    )
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord({"num-examples": len(ids)}),
            META_KEY: ConfigRecord(
                {"server-round": 1, "feature-dtype": dtype, "node-key": str(node_id)}
            ),
        }
    )
    return make_message(content, node_id, 0, MessageType.TRAIN)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_one_dimensional_features_train_your_own_server_model(task_identity, dtype) -> None:
    # Prepare: the class count is read off the model's output
    trainer = ServerTrainer(model=_mlp(), feature_shape=(WIDTH,), batch_size=8, device="cpu")
    assert trainer.num_classes == CLASSES and trainer.model_name == "Sequential"
    strategy = FedGKT(trainer, feature_dtype=dtype, feature_shape=(WIDTH,), min_available_nodes=1)
    grid = FakeGrid([1, 2])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    strategy.configure_train(1, None, ConfigRecord(), grid)
    # Execute
    _, metrics = strategy.aggregate_train(
        1, [_reply(1, np.arange(0, 20), dtype), _reply(2, np.arange(20, 36), dtype)]
    )
    sent = {
        m.metadata.dst_node_id: m for m in strategy.configure_train(2, None, ConfigRecord(), grid)
    }
    # Assert
    assert strategy.engine.current.rejected_replies == [] and metrics["replies"] == 2
    params = list(trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    logits = record_arrays(sent[1].content.array_records[LOGITS_KEY])["logits"]
    assert logits.shape == (20, CLASSES) and np.isfinite(logits).all()


def test_one_dimensional_int8_features_keep_each_features_own_step() -> None:
    # Prepare: per feature, a distinct offset and range
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, WIDTH, generator=gen) * torch.arange(1, WIDTH + 1) + torch.arange(WIDTH) - 7
    # Execute
    decoded = decode_features(encode_features(x, "int8"))
    # Assert: error within half a step of each feature's own range (plus rounding)
    bound = (x.max(0).values - x.min(0).values) / 255 / 2
    assert ((decoded - x).abs() <= bound * 1.001 + 1e-5).all()


def test_features_of_another_shape_are_rejected(task_identity) -> None:
    trainer = ServerTrainer(model=_mlp(), feature_shape=(WIDTH,), batch_size=8, device="cpu")
    strategy = FedGKT(trainer, feature_dtype="float16", feature_shape=(WIDTH,))
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2]))
    strategy.aggregate_train(1, [_reply(1, np.arange(8), "float16", width=WIDTH + 1)])
    rejected = strategy.engine.current.rejected_replies
    assert len(rejected) == 1 and "expected (N, 24)" in rejected[0]["reason"]


def test_a_model_that_does_not_fit_the_feature_shape_is_refused_at_once() -> None:
    trainer = ServerTrainer(model=_mlp(), feature_shape=(WIDTH,), device="cpu")
    with pytest.raises(ValueError, match="does not take features of shape"):
        FedGKT(trainer, feature_shape=(16, 32, 32))
    with pytest.raises(ValueError, match="expects 7 classes"):
        FedGKT(ServerTrainer(7, model=_mlp(), device="cpu"), feature_shape=(WIDTH,))


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_one_dimensional_features_arrive_with_their_values(task_identity, dtype) -> None:
    # Prepare: features with a distinct offset and range per feature
    gen = torch.Generator().manual_seed(3)
    sent = torch.rand(20, WIDTH, generator=gen) * torch.arange(1, WIDTH + 1) + torch.arange(WIDTH)
    arrays = encode_features(sent, dtype).arrays()
    ids = np.arange(20)
    arrays.update(
        logits=np.zeros((20, CLASSES), np.float32), labels=ids % CLASSES, ids=ids.astype(np.int64)
    )
    reply = _reply(1, ids, dtype)
    reply.content.array_records[FEATURES_KEY] = arrays_record(arrays)
    strategy = FedGKT(
        _mlp(),
        feature_dtype=dtype,
        feature_shape=(WIDTH,),
        min_available_nodes=1,
        min_train_nodes=1,
        server_epochs=0,
    )
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1]))
    # Execute
    strategy.aggregate_train(1, [reply])
    stored = strategy.engine.store.node_features("1")
    # Assert: within each wire dtype's rounding, worked out from the values sent
    # (float16 keeps 11 significant bits, bfloat16 8, int8 half of 1/255 of a
    # feature's range)
    error = (stored - sent).abs()
    if dtype == "float32":
        assert torch.equal(stored, sent)
    elif dtype == "int8":
        step = (sent.max(0).values - sent.min(0).values) / 255
        assert (error <= step / 2 * 1.001 + 1e-6).all()
    else:
        bits = {"float16": 11, "bfloat16": 8}[dtype]
        assert (error <= sent.abs() * 2.0**-bits).all()
    assert error.max() > 0 or dtype == "float32"


def test_fedgkt_takes_the_server_training_settings_for_a_bare_model(task_identity) -> None:
    # Prepare
    strategy = FedGKT(
        _mlp(),
        feature_shape=(WIDTH,),
        server_lr=0.05,
        server_batch_size=7,
        temperature=2.0,
        alpha=0.5,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0, momentum=0.9),
        lr_schedule=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        precision="float32",
        device="cpu",
        min_available_nodes=1,
        server_epochs=2,
        feature_dtype="float32",
    )
    trainer = strategy.trainer
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2]))
    # Execute: one round of two server epochs
    strategy.aggregate_train(1, [_reply(1, np.arange(0, 20), "float32")])
    # Assert: the settings reached the trainer; the schedule stepped once an epoch
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    assert (trainer.batch_size, trainer.temperature, trainer.alpha) == (7, 2.0, 0.5)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)
    assert "scheduler" in trainer.state_dict() and trainer.plateau is None


def test_training_settings_with_a_server_trainer_are_refused() -> None:
    trainer = ServerTrainer(model=_mlp(), feature_shape=(WIDTH,), device="cpu")
    with pytest.raises(ValueError, match="server_lr, temperature: give these to your"):
        FedGKT(trainer, server_lr=0.1, temperature=2.0)


class ViewAfterConv(nn.Module):
    """A server part as Flower's quickstart Net ends: a convolution, then ``view``
    (which a channels-last tensor cannot take)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(-1, 6 * 4 * 4))


def test_a_server_model_that_views_after_a_convolution_trains() -> None:
    # Prepare
    trainer = ServerTrainer(model=ViewAfterConv(), feature_shape=(4, 6, 6), device="cpu")
    store = FeatureStore()
    features = torch.rand(8, 4, 6, 6)
    payload = validate_payload(
        {
            **encode_features(features, "float32").arrays(),
            "logits": np.zeros((8, 3), dtype=np.float32),
            "labels": np.arange(8) % 3,
            "ids": np.arange(8),
        },
        "float32",
        (4, 6, 6),
        3,
    )
    store.put("0", payload, 1)
    # Execute
    result = trainer.train(store, epochs=1)
    ids, logits = trainer.logits_for(store, "0")
    # Assert: it trained and scored in the contiguous layout it needs
    assert not trainer.channels_last
    assert result.samples == 8 and logits.shape == (8, 3)
