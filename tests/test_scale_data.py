"""Data for many nodes: ``synthetic`` sized per node, and a run whose data cannot be
split over its nodes stops before its first round with one message."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import UntouchedGrid
from inprocess import server_context

from flwr_fedgkt import server_app
from flwr_fedgkt.data import PartitionError, check_partitions, load_partition
from flwr_fedgkt.data.offline import offline_labels, synthetic
from flwr_fedgkt.node import load_node_partition
from flwr_fedgkt.settings import ConfigError, RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "baselines" / "fedavg"))


pytestmark = pytest.mark.usefixtures("fresh_data_caches")


def test_synthetic_holds_the_samples_per_node_times_the_partitions() -> None:
    # Execute: 7 per node over 4 partitions = 28 samples
    parts = [
        load_partition("synthetic", i, 4, seed=3, synthetic_samples_per_node=7) for i in range(4)
    ]
    # Assert: 7 each, round(0.2 * 7) = 1 to test and 6 to train; ids 0..27, once each
    for part in parts:
        assert (len(part.train), len(part.test)) == (6, 1)
    ids = np.concatenate([np.concatenate([p.train.ids, p.test.ids]) for p in parts])
    assert sorted(ids.tolist()) == list(range(28))
    # classes in equal shares: 28 samples over 10 classes -> 3, 3, ..., 2, 2
    labels = np.concatenate([np.concatenate([p.train.labels, p.test.labels]) for p in parts])
    assert sorted(np.bincount(labels, minlength=10).tolist()) == [2, 2] + [3] * 8


def test_the_default_synthetic_set_is_unchanged_and_its_labels_need_no_images() -> None:
    full, classes = synthetic(42)
    labels, label_classes = offline_labels("synthetic", 42)
    assert len(full) == 600 and classes == label_classes == 10
    assert np.array_equal(full.labels.numpy(), labels)
    assert full.labels[:10].tolist() == [6, 9, 5, 4, 5, 8, 4, 6, 7, 7]
    big, _ = synthetic(42, 1000)
    assert np.array_equal(big.labels.numpy(), offline_labels("synthetic", 42, 1000)[0])
    assert np.bincount(big.labels.numpy()).tolist() == [100] * 10


def test_the_run_config_key_reaches_the_nodes_partition() -> None:
    config = RunConfig.from_mapping(
        {"dataset": "synthetic", "synthetic-samples-per-node": 30, "seed": 1}
    )
    # 600 samples could not be split 1000 ways: 30 per node make 30,000
    part = load_node_partition(999, 1000, config)
    assert (len(part.train), len(part.test)) == (24, 6)  # round(0.2 * 30) = 6 to test
    assert int(np.concatenate([part.train.ids, part.test.ids]).max()) < 30_000


def test_a_set_too_small_for_its_partitions_is_named_with_the_fix() -> None:
    with pytest.raises(PartitionError) as caught:
        check_partitions("synthetic", 1000)
    message = str(caught.value)
    assert message.startswith("synthetic (600 samples) cannot be split into 1000 partitions")
    assert "at least 2 samples" in message and "synthetic-samples-per-node" in message
    with pytest.raises(PartitionError, match=r"digits \(1797 samples\).*1000 partitions"):
        load_partition("digits", 0, 1000)
    # 300 partitions of 2: one sample to train on, one to test on
    assert check_partitions("synthetic", 300) == (
        "synthetic: 600 samples in 300 iid partitions of 2 to 2 samples"
    )
    assert check_partitions("synthetic", 1000, synthetic_samples_per_node=30) == (
        "synthetic: 30000 samples in 1000 iid partitions of 30 to 30 samples"
    )


def test_a_dirichlet_split_that_cannot_be_drawn_says_what_to_change() -> None:
    with pytest.raises(PartitionError) as caught:
        check_partitions("digits", 100, "dirichlet", 0.1, min_partition_size=10)
    message = str(caught.value)
    assert message.startswith("digits (1797 samples) cannot be split into 100 dirichlet")
    assert "min-partition-size" in message and "dirichlet-alpha" in message


@pytest.mark.parametrize("value", [-1, 1])
def test_samples_per_node_must_leave_a_train_and_a_test_sample(value) -> None:
    with pytest.raises(ConfigError, match="synthetic-samples-per-node"):
        RunConfig.from_mapping({"synthetic-samples-per-node": value})


@pytest.mark.parametrize("app", ["fedgkt", "fedavg"])
def test_a_server_app_stops_before_its_first_round_with_one_message(
    tmp_path, monkeypatch, app
) -> None:
    # Prepare: 1000 nodes, and synthetic at its default 600 samples
    if app == "fedgkt":
        module = server_app
    else:
        from fedavg_baseline import server_app as module
    logged: list[tuple[int, str]] = []
    monkeypatch.setattr(module, "log", lambda level, msg, *a: logged.append((level, msg % a)))
    out = tmp_path / "out"
    run_config = {"dataset": "synthetic", "output-dir": str(out), "min-available-nodes": 1000}
    context = server_context(run_config)
    # Execute
    module.main(UntouchedGrid(range(1, 1001)), context)
    # Assert: one error, the run's status says it, no round and no plot
    errors = [message for level, message in logged if level == 40]
    assert len(errors) == 1
    assert errors[0].startswith("synthetic (600 samples) cannot be split into 1000 partitions")
    assert errors[0].endswith("The run stops before its first round.")
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["rounds"] == []
    assert "synthetic-samples-per-node" in results["error"]
    assert not (out / "label_distribution.png").exists()
