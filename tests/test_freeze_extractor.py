"""freeze-extractor: a node uploads its (unchanging) features once; the server keeps
them and still trains on them; later replies carry only ids and logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType
from inprocess import InProcessGrid, model_hash, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.codec import PayloadError, encode_features
from flwr_fedgkt.data import load_partition
from flwr_fedgkt.edge import EdgeTrainer
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT
from flwr_fedgkt.validation import validate_payload, validate_update


def _run_config(**overrides) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 64,
        "batch-size": 16,
        "server-epochs": 1,
        "seed": 3,
        "feature-dtype": "float16",
        "freeze-extractor": True,
        **overrides,
    }


def _strategy(run_config: dict, **kwargs) -> FedGKT:
    config = RunConfig.from_mapping({**run_config, "device": "cpu"})
    trainer = ServerTrainer.from_run_config(config, num_classes=10)
    return FedGKT(
        trainer,
        server_epochs=config.server_epochs,
        feature_dtype=config.feature_dtype,
        freeze_extractor=config.freeze_extractor,
        **kwargs,
    )


class Recorder:
    """Wraps the ClientApp functions and keeps every reply's array names per round
    (a training reply's test upload as the evaluation's)."""

    def __init__(self) -> None:
        self.arrays: dict[tuple[int, str, int], list[str]] = {}

    def handler(self, kind: str):
        default = client_app.train if kind == MessageType.TRAIN else client_app.evaluate

        def handle(msg: Message, context) -> Message:
            reply = default(msg, context)
            server_round = int(msg.content.config_records["config"]["server-round"])
            records = reply.content.array_records
            for record, upload in (("features", kind), ("test-features", MessageType.EVALUATE)):
                if record in records:
                    names = list(records[record].keys())
                    self.arrays[(msg.metadata.dst_node_id, upload, server_round)] = names
            return reply

        return handle


def test_frozen_edge_keeps_its_stem_and_features_while_the_head_trains() -> None:
    # Prepare
    data = load_partition("synthetic", 0, 4, seed=3).train
    trainer = EdgeTrainer(10, device="cpu", seed=3, freeze_extractor=True)
    stem_before = {k: v.clone() for k, v in trainer.model.stem.state_dict().items()}
    fc_before = trainer.model.fc.weight.detach().clone()
    features_before = trainer.extract(data).features
    # Execute
    trainer.train(data, epochs=1, batch_size=16)
    # Assert: stem weights and BatchNorm statistics unchanged, so are the features
    for key, value in trainer.model.stem.state_dict().items():
        assert torch.equal(value, stem_before[key]), key
    assert not torch.equal(trainer.model.fc.weight, fc_before)
    assert torch.equal(trainer.extract(data).features, features_before)


def test_second_participation_uploads_no_features_and_the_server_still_trains(
    task_identity,
) -> None:
    # Prepare: two of three partitions, three rounds
    run_config = _run_config()
    recorder = Recorder()
    contexts = {101 + i: node_context(101 + i, i, 3, run_config) for i in range(2)}
    grid = InProcessGrid(
        contexts,
        handlers={
            (node, kind): recorder.handler(kind)
            for node in contexts
            for kind in (MessageType.TRAIN, MessageType.EVALUATE)
        },
    )
    strategy = _strategy(run_config)
    hashes = []
    strategy.engine.on_round_end = lambda record: hashes.append(model_hash(strategy.trainer.model))
    # Execute
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=3)
    # Assert: features travel in round 1 only, for training and for evaluation
    for node in contexts:
        assert "features" in recorder.arrays[(node, MessageType.TRAIN, 1)]
        assert "features" in recorder.arrays[(node, MessageType.EVALUATE, 1)]
        for server_round in (2, 3):
            assert sorted(recorder.arrays[(node, MessageType.TRAIN, server_round)]) == [
                "ids",
                "logits",
            ]
            assert recorder.arrays[(node, MessageType.EVALUATE, server_round)] == ["ids"]
    first, second, third = strategy.history
    assert first["cached_feature_nodes"] == 0
    assert second["cached_feature_nodes"] == third["cached_feature_nodes"] == 2
    assert second["bytes_up"] * 20 < first["bytes_up"]
    # the server trained on the kept features in every round and scored all test samples
    assert len(set(hashes)) == 3
    assert second["stored_samples"] == first["stored_samples"] > 0
    assert third["eval_samples"] == first["eval_samples"] > 0
    assert third["accuracy"] is not None
    assert strategy.history[-1]["rejected_replies"] == []


def test_a_node_whose_features_were_dropped_sends_them_again(task_identity) -> None:
    # Prepare: node 102 fails round 2; with max-staleness 0 its features are dropped
    run_config = _run_config()
    recorder = Recorder()
    record_train = recorder.handler(MessageType.TRAIN)

    def fails_in_round_2(msg: Message, context) -> Message:
        if int(msg.content.config_records["config"]["server-round"]) == 2:
            raise RuntimeError("offline")
        return record_train(msg, context)

    contexts = {101 + i: node_context(101 + i, i, 3, run_config) for i in range(2)}
    grid = InProcessGrid(
        contexts,
        handlers={
            (101, MessageType.TRAIN): record_train,
            (102, MessageType.TRAIN): fails_in_round_2,
        },
    )
    strategy = _strategy(run_config, max_staleness=0)
    # Execute
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=3)
    # Assert
    assert "features" not in recorder.arrays[(101, MessageType.TRAIN, 3)]
    assert "features" in recorder.arrays[(102, MessageType.TRAIN, 3)]
    assert strategy.history[1]["stored_nodes"] == 1
    assert strategy.history[2]["stored_nodes"] == 2
    assert strategy.history[2]["cached_feature_nodes"] == 1


def _payload(n: int = 5):
    features = torch.relu(torch.randn(n, 16, 4, 4, generator=torch.Generator().manual_seed(1)))
    arrays = encode_features(features, "float16").arrays()
    arrays["logits"] = np.zeros((n, 10), dtype=np.float32)
    arrays["labels"] = np.arange(n, dtype=np.int64)
    arrays["ids"] = np.arange(40, 40 + n, dtype=np.int64)
    return validate_payload(arrays, "float16", (16, 4, 4), 10)


def test_an_update_reuses_the_kept_features_with_new_logits() -> None:
    cached = _payload()
    logits = np.ones((5, 10), dtype=np.float32)
    update = validate_update({"ids": cached.ids.copy(), "logits": logits}, cached, 10)
    assert update.features is cached.features
    assert np.array_equal(update.labels, cached.labels)
    assert np.array_equal(update.logits, logits)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"logits": np.zeros((5, 10), np.float32)}, "missing arrays: ids"),
        ({"ids": np.arange(40, 45)}, "missing arrays: logits"),
        (
            {"ids": np.arange(41, 46), "logits": np.zeros((5, 10), np.float32)},
            "ids differ",
        ),
        (
            {"ids": np.arange(40, 44), "logits": np.zeros((4, 10), np.float32)},
            "ids have shape",
        ),
        (
            {"ids": np.arange(40, 45), "logits": np.full((5, 10), np.nan, np.float32)},
            "NaN",
        ),
        ({"ids": np.arange(40, 45), "logits": np.zeros((5, 9), np.float32)}, "logits have shape"),
    ],
)
def test_a_malformed_update_is_rejected_with_a_reason(arrays, message) -> None:
    with pytest.raises(PayloadError, match=message):
        validate_update(arrays, _payload(), 10)
