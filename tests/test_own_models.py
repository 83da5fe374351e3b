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
