"""A run on Flower's simulation engine in which one node replies with a malformed
payload and another raises: the well-behaved nodes finish the round."""

import json

import pytest
from flower_processes import REPO, flower_environment, flwr_run, start_local_superlink

pytestmark = pytest.mark.e2e


def test_malformed_and_crashing_nodes_do_not_stop_the_round(tmp_path) -> None:
    # Prepare: four nodes; partition 2 sends labels out of range, partition 3 raises
    out = tmp_path / "out"
    with flower_environment(tmp_path) as env:
        start_local_superlink(env, tmp_path / "superlink.log")
        # Execute
        result = flwr_run(
            env, REPO / "tests" / "apps" / "faulty", f"output-dir='{out}'", num_supernodes=4
        )
    # Assert
    assert result.returncode == 0, result.stdout[-4000:]
    record = json.loads((out / "results.json").read_text())["rounds"][0]
    assert record["train_nodes"] == 2
    assert len(record["rejected_replies"]) == 1
    assert "labels out of range" in record["rejected_replies"][0]["reason"]
    assert len(record["failed_nodes"]) == 1
    assert "simulated crash on partition 3" in record["failed_nodes"][0]["reason"]
    assert record["accuracy"] is not None and record["eval_nodes"] == 4
    assert record["stored_samples"] > 0
