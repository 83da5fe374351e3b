"""End to end on Flower's simulation engine (Ray), through ``flwr run``."""

import json

import pytest
from flower_processes import REPO, flower_environment, flwr_run, start_local_superlink

pytestmark = pytest.mark.e2e


def test_flwr_run_trains_fedgkt_and_writes_results(tmp_path) -> None:
    # Prepare
    out = tmp_path / "out"
    run_config = (
        f"num-server-rounds=2 dataset='synthetic' server-epochs=2 batch-size=16 "
        f"client-epochs=1 feature-dtype='float16' output-dir='{out}' seed=1"
    )
    with flower_environment(tmp_path) as env:
        start_local_superlink(env, tmp_path / "superlink.log")
        # Execute
        result = flwr_run(env, REPO, run_config, num_supernodes=3)
    # Assert
    assert result.returncode == 0, result.stdout[-4000:]
    assert "round 2: accuracy" in result.stdout, result.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
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
        assert record["train_nodes"] == 3
    assert rounds[0]["bytes_down"] == 0  # no server logits before the first round
    assert rounds[1]["bytes_down"] > 0  # each node got its own logits back
    assert rounds[-1]["accuracy"] > 0.2  # ten classes: chance is 0.1
