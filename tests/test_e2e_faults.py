"""A run on Flower's simulation engine with hostile and crashing nodes beside
honest ones: every round finishes, the honest nodes are trained and scored, and
each bad reply is rejected with its reason."""

import json
import math

import pytest
from flower_processes import REPO, flwr_run

pytestmark = pytest.mark.e2e


FAULTY = REPO / "tests" / "apps" / "faulty"


def test_hostile_and_crashing_nodes_do_not_stop_the_run(flower_federation) -> None:
    # Prepare: six nodes with the default int8 features; partition 2 sends labels
    # out of range, 3 raises, 4 sends a list-valued metric, 5 an int8 scale of 1e37
    env, home = flower_federation
    out = home / "faulty"
    # Execute
    result = flwr_run(env, FAULTY, f"output-dir='{out}'", num_supernodes=6)
    # Assert
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Exit Code" not in result.stdout, result.stdout[-4000:]
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "completed"
    assert [r["round"] for r in written["rounds"]] == [1, 2]
    for record in written["rounds"]:
        reasons = {r["node_key"]: r["reason"] for r in record["rejected_replies"]}
        assert len(record["rejected_replies"]) == 4
        train_rejected = [r for r in record["rejected_replies"] if r["node_key"] != "4"]
        assert {r["node_key"] for r in train_rejected} == {"2", "5"}
        assert "labels out of range" in reasons["2"]
        assert "max-feature-abs" in reasons["5"]
        list_metric = [r["reason"] for r in record["rejected_replies"] if r["node_key"] == "4"]
        assert len(list_metric) == 2  # its training and its evaluation reply
        assert "'train-loss' is a list" in list_metric[0]
        assert "'edge-accuracy' is a list" in list_metric[1]
        assert len(record["failed_nodes"]) == 1
        # the ClientApp's exception in one line, out of Flower's wrapped traceback
        assert record["failed_nodes"][0]["reason"] == "RuntimeError: simulated crash on partition 3"
        assert record["train_nodes"] == 2  # partitions 0 and 1
        assert record["eval_nodes"] == 5  # all but partition 4
        assert math.isfinite(record["accuracy"]) and math.isfinite(record["server_train_loss"])
        assert record["stored_nodes"] == 2


def test_one_error_on_every_node_stops_the_run_after_round_1(flower_federation) -> None:
    # Prepare: every node's ClientApp raises the same ValueError
    env, home = flower_federation
    out = home / "same-error"
    config = (
        f"output-dir='{out}' every-node-raises=true num-server-rounds=5 "
        "min-available-nodes=2 min-train-nodes=2 min-evaluate-nodes=2"
    )
    # Execute
    result = flwr_run(env, FAULTY, config, num_supernodes=2)
    # Assert: round 1 only, and one line that names the error and the fix
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "no-progress", result.stdout[-4000:]
    assert [r["round"] for r in written["rounds"]] == [1]
    assert "\n" not in written["error"] and "fix it" in written["error"]
    assert "ValueError: item 0 of the data set is a dict without 'img'" in written["error"]
    assert written["error"] in result.stdout
