"""The FedAvg baseline (baselines/fedavg): config, metered strategy, ClientApp, FAB."""

import io
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flower_processes import REPO
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from inprocess import node_context

from flwr_fedgkt.data import load_partition
from flwr_fedgkt.models import seeded_model
from flwr_fedgkt.settings import ConfigError

BASELINE = REPO / "baselines" / "fedavg"
sys.path.insert(0, str(BASELINE))

from fedavg_baseline.client_app import evaluate, train  # noqa: E402
from fedavg_baseline.config import FedAvgConfig  # noqa: E402
from fedavg_baseline.strategy import MeteredFedAvg  # noqa: E402


def _model_arrays(seed: int = 0) -> ArrayRecord:
    return ArrayRecord(seeded_model("resnet56", 10, seed).state_dict())


def _reply(msg: Message, arrays: ArrayRecord, num_examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(
                {"num-examples": num_examples, "train_loss": 1.0, "train_accuracy": 0.5}
            ),
        }
    )
    return make_message(
        content,
        src_node_id=msg.metadata.dst_node_id,
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )


def _eval_reply(node_id: int, accuracy: float, num_examples: int) -> Message:
    content = RecordDict(
        {"metrics": MetricRecord({"num-examples": num_examples, "accuracy": accuracy, "loss": 1.0})}
    )
    return make_message(
        content, src_node_id=node_id, dst_node_id=0, message_type=MessageType.EVALUATE
    )


# -- config --------------------------------------------------------------------------


def test_config_shares_fedgkt_keys_and_adds_fedavg_keys() -> None:
    # Prepare
    mapping = {"num-server-rounds": 4, "dataset": "synthetic", "model": "resnet110", "seed": 7}
    # Execute
    config = FedAvgConfig.from_mapping(mapping)
    # Assert
    assert config.run.num_server_rounds == 4
    assert config.run.dataset == "synthetic"
    assert config.model == "resnet110"
    assert config.to_dict()["model"] == "resnet110"
    assert config.to_dict()["seed"] == 7


def test_cosine_schedule_decays_the_client_lr_to_five_percent() -> None:
    # Prepare
    config = FedAvgConfig.from_mapping({"num-server-rounds": 4, "client-lr": 0.1})
    # Execute
    lrs = [config.client_lr(r) for r in (1, 2, 3, 4, 5)]
    # Assert: lr in round 1, decreasing, 5 % of lr after the last round
    assert lrs[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] == pytest.approx(0.005)


@pytest.mark.parametrize(
    "key, value", [("model", "resnet55"), ("optimizer", "lbfgs"), ("momentum", 1.5)]
)
def test_invalid_fedavg_keys_are_refused_by_name(key: str, value: object) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=key):
        FedAvgConfig.from_mapping({key: value})


# -- metered strategy ----------------------------------------------------------------


def test_strategy_counts_the_bytes_of_every_message_sent_and_received(task_identity) -> None:
    # Prepare
    records: list[dict] = []
    strategy = MeteredFedAvg(on_round_end=records.append, lr_for_round=lambda r: 0.1 / r)
    grid = FakeGrid([11, 22, 33])
    model = _model_arrays()
    model_bytes = model.count_bytes()
    # Execute: one full round
    sent = list(strategy.configure_train(1, model, ConfigRecord(), grid))
    replies = [_reply(m, _model_arrays(i), 10 * (i + 1)) for i, m in enumerate(sent)]
    arrays, _ = strategy.aggregate_train(1, replies)
    sent_eval = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    strategy.aggregate_evaluate(
        1, [_eval_reply(m.metadata.dst_node_id, 0.5, 10) for m in sent_eval]
    )
    # Assert: counted = the sizes of the ArrayRecords that were sent
    record = records[-1]
    down_train = sum(m.content.array_records["arrays"].count_bytes() for m in sent)
    down_eval = sum(m.content.array_records["arrays"].count_bytes() for m in sent_eval)
    up_train = sum(r.content.array_records["arrays"].count_bytes() for r in replies)
    assert record["bytes_down_train"] == down_train == 3 * model_bytes
    assert record["bytes_down_evaluate"] == down_eval
    assert record["bytes_up_train"] == up_train
    assert record["bytes_up_evaluate"] == 0  # evaluation replies carry metrics only
    assert record["bytes_down"] == down_train + down_eval
    assert record["bytes_up"] == up_train
    assert [c["node_id"] for c in record["per_client"]] == [11, 22, 33]
    for client in record["per_client"]:
        assert client["bytes_down_train"] == model_bytes
        assert client["bytes_up_train"] == model_bytes
    assert sum(c["bytes_down"] for c in record["per_client"]) == record["bytes_down"]
    assert record["train_samples"] == 60
    assert record["accuracy"] == pytest.approx(0.5)
    assert record["client_lr"] == pytest.approx(0.1)
    assert sent[0].content.config_records["config"]["client-lr"] == pytest.approx(0.1)


def test_strategy_profiles_the_round_with_the_seconds_its_nodes_report(task_identity) -> None:
    # Prepare: three nodes report their seconds (one an absurd value, ignored)
    records: list[dict] = []
    strategy = MeteredFedAvg(on_round_end=records.append)
    grid = FakeGrid([11, 22, 33])
    sent = list(strategy.configure_train(1, _model_arrays(), ConfigRecord(), grid))
    replies = [_reply(m, _model_arrays(i), 10) for i, m in enumerate(sent)]
    reported = [(1.5, 2.0), (2.5, 3.0), (1e9, 1e9)]  # (edge-train-seconds, node-seconds)
    for reply, (training, handler) in zip(replies, reported, strict=True):
        reply.content.metric_records["metrics"]["edge-train-seconds"] = training
        reply.content.metric_records["metrics"]["node-seconds"] = handler
    # Execute: the round, the evaluation nodes reporting 0.25 s each
    arrays, _ = strategy.aggregate_train(1, replies)
    sent_eval = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid))
    evals = [_eval_reply(m.metadata.dst_node_id, 0.5, 10) for m in sent_eval]
    for reply in evals:
        reply.content.metric_records["metrics"]["node-seconds"] = 0.25
    strategy.aggregate_evaluate(1, evals)
    # Assert: the sums by hand; the phase waits and the aggregation measured
    profile = records[-1]["profile"]
    assert profile["node_train"] == pytest.approx(1.5 + 2.5)
    assert profile["node_handler"] == pytest.approx(2.0 + 3.0)
    assert profile["node_evaluate"] == pytest.approx(3 * 0.25)
    assert {"train_wait", "evaluate_wait", "aggregate"} <= set(profile)
    assert all(v >= 0 for v in profile.values())


def test_strategy_averages_the_models_weighted_by_examples(task_identity) -> None:
    # Prepare
    strategy = MeteredFedAvg()
    grid = FakeGrid([1, 2])
    sent = list(strategy.configure_train(1, _model_arrays(0), ConfigRecord(), grid))
    first, second = _model_arrays(1), _model_arrays(2)
    replies = [_reply(sent[0], first, 30), _reply(sent[1], second, 10)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert
    key = "fc.weight"
    expected = 0.75 * first[key].numpy() + 0.25 * second[key].numpy()
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(1.0)


# -- ClientApp -----------------------------------------------------------------------

RUN_CONFIG = {
    "dataset": "synthetic",
    "batch-size": 16,
    "client-epochs": 1,
    "seed": 3,
    "optimizer": "sgd",
    "client-lr": 0.01,
}


def _message(kind: str, arrays: ArrayRecord, server_round: int = 1) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    return make_message(content, src_node_id=0, dst_node_id=101, message_type=kind)


def test_client_trains_the_global_model_on_its_own_partition() -> None:
    # Prepare
    context = node_context(101, 1, 8, RUN_CONFIG)
    partition = load_partition("synthetic", 1, 8, "iid", 0.5, 3)
    start = _model_arrays(5)
    # Execute
    reply = train(_message(MessageType.TRAIN, start), context)
    # Assert
    arrays = reply.content.array_records["arrays"]
    metrics = reply.content.metric_records["metrics"]
    assert set(arrays.keys()) == set(start.keys())
    assert metrics["num-examples"] == len(partition.train)
    assert not np.allclose(arrays["fc.weight"].numpy(), start["fc.weight"].numpy())
    assert arrays["stem.0.weight"].numpy().flags["C_CONTIGUOUS"]


def test_a_slow_partition_holds_its_reply_back_as_fedgkts_node_does(monkeypatch) -> None:
    # Prepare: partition 1 of 8 is slow, 3x
    waits: list[float] = []
    monkeypatch.setattr("flwr_fedgkt.stragglers.time.sleep", waits.append)
    config = {**RUN_CONFIG, "slow-partitions": "1", "slowdown": 3.0}
    # Execute
    reply = train(_message(MessageType.TRAIN, _model_arrays(5)), node_context(101, 1, 8, config))
    # Assert: it waited (3 - 1) x the training seconds it reports
    trained = float(reply.content.metric_records["metrics"]["edge-train-seconds"])
    assert trained > 0 and waits == [pytest.approx(2 * trained)]


def test_client_training_is_reproducible_for_a_seed_node_and_round() -> None:
    # Prepare
    start = _model_arrays(5)
    # Execute
    first = train(_message(MessageType.TRAIN, start, 2), node_context(102, 2, 8, RUN_CONFIG))
    again = train(_message(MessageType.TRAIN, start, 2), node_context(102, 2, 8, RUN_CONFIG))
    # Assert
    key = "fc.weight"
    np.testing.assert_allclose(
        first.content.array_records["arrays"][key].numpy(),
        again.content.array_records["arrays"][key].numpy(),
    )


def test_client_evaluates_the_global_model_on_its_test_split() -> None:
    # Prepare
    context = node_context(100, 0, 8, RUN_CONFIG)
    partition = load_partition("synthetic", 0, 8, "iid", 0.5, 3)
    # Execute
    reply = evaluate(_message(MessageType.EVALUATE, _model_arrays(5)), context)
    # Assert
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == len(partition.test)
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert np.isfinite(metrics["loss"])
    assert not reply.content.array_records  # nothing but metrics goes back


# -- Flower App ----------------------------------------------------------------------


def test_fab_holds_the_baseline_package_and_no_output_files(tmp_path) -> None:
    # Prepare: an output file left in the app folder must not be packaged
    from flwr.cli.build import build_fab_from_disk

    stray = BASELINE / "outputs-test" / "results.json"
    stray.parent.mkdir(exist_ok=True)
    stray.write_text("{}")
    try:
        # Execute
        fab = build_fab_from_disk(BASELINE)
    finally:
        stray.unlink()
        stray.parent.rmdir()
    # Assert
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "fedavg_baseline/client_app.py" in names
    assert "fedavg_baseline/server_app.py" in names
    assert not [n for n in names if n.endswith(".json")]


def test_initial_model_is_the_seeded_full_model() -> None:
    # Prepare / Execute
    a = seeded_model("resnet56", 10, 42).state_dict()
    b = seeded_model("resnet56", 10, 42).state_dict()
    # Assert: the server starts every run with the same weights for the same seed
    assert all(torch.equal(a[k], b[k]) for k in a)
