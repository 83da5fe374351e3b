"""End to end on Flower's simulation engine (Ray), through ``flwr run``."""

import pytest
from conftest import E2E_NODES

pytestmark = pytest.mark.e2e


def test_flwr_run_trains_fedgkt_and_writes_results(message_api_run) -> None:
    # Prepare / Execute: `flwr run .` on two simulated nodes, two rounds (conftest)
    results, stdout = message_api_run
    # Assert
    assert "round 2: accuracy" in stdout, stdout[-4000:]
    assert "Partitions: synthetic: 600 samples in 2 iid partitions of 300 to 300" in stdout
    assert results["status"] == "completed"
    assert results["config"]["feature-dtype"] == "int8"  # the default, end to end
    assert results["edge_model"]["params"] == 10_586
    assert results["server_model"]["params"] == 590_858
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        for key in (
            "accuracy",
            "edge_accuracy",
            "loss",
            "bytes_up",
            "bytes_down",
            "server_train_seconds",
            "rejected_replies",
        ):
            assert key in record, key
        assert record["bytes_up"] > 0
        assert record["rejected_replies"] == []
        assert record["train_nodes"] == E2E_NODES
        # synthetic-samples-per-node=300: 240 to train on and 60 to test on per node
        assert record["stored_samples"] == E2E_NODES * 240
    assert rounds[0]["bytes_down"] == 0  # no server logits before the first round
    assert rounds[1]["bytes_down"] > 0  # each node got its own logits back
    assert rounds[-1]["accuracy"] > 0.2  # ten classes: chance is 0.1
