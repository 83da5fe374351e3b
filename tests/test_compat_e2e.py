"""The legacy-API example app end to end on Flower's simulation engine, through
``flwr run``, and against the Message-API app on the same seed and data."""

import pytest
from conftest import run_app
from flower_processes import REPO

pytestmark = pytest.mark.e2e

LEGACY_APP = REPO / "examples" / "legacy-api"
ROUND_FIELDS = (
    "round",
    "accuracy",
    "loss",
    "edge_accuracy",
    "edge_loss",
    "bytes_up",
    "bytes_down",
    "server_train_seconds",
    "server_train_loss",
    "seconds",
    "rejected_replies",
    "failed_nodes",
    "train_nodes",
    "eval_nodes",
    "stored_samples",
)


@pytest.fixture(scope="module")
def legacy_run(flower_federation) -> tuple[dict, str]:
    return run_app(flower_federation, LEGACY_APP, "legacy")


def test_legacy_app_trains_fedgkt_and_writes_results(legacy_run) -> None:
    # Prepare / Execute: the legacy app, two rounds on two simulated nodes
    results, stdout = legacy_run
    # Assert
    assert "round 2: accuracy" in stdout, stdout[-4000:]
    assert results["flower_api"] == "legacy"
    assert results["edge_model"]["params"] == 10_586
    assert results["config"]["num-server-rounds"] == 2
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        missing = [key for key in ROUND_FIELDS if key not in record]
        assert not missing, missing
        assert record["bytes_up"] > 0
        assert record["rejected_replies"] == [] and record["failed_nodes"] == []
        assert record["train_nodes"] == 2 and record["eval_nodes"] == 2
    assert rounds[0]["bytes_down"] == 0  # no server logits before the first round
    assert rounds[1]["bytes_down"] > 0  # each node got its own logits back
    assert rounds[-1]["accuracy"] > 0.2  # ten classes: chance is 0.1


def test_legacy_and_message_api_apps_give_the_same_results(legacy_run, message_api_run) -> None:
    # Prepare / Execute: the same run config (seed, data, partitions) on both faces
    legacy, _ = legacy_run
    message, _ = message_api_run

    # Assert: same fields, and the same server and edge models round after round
    def settings(results: dict) -> dict:
        return {k: v for k, v in results["config"].items() if k != "output-dir"}

    assert settings(legacy) == settings(message)
    assert legacy["server_model"] == message["server_model"]
    for ours, theirs in zip(legacy["rounds"], message["rounds"], strict=True):
        assert set(theirs) <= set(ours)
        assert ours["stored_samples"] == theirs["stored_samples"]
        for key in ("accuracy", "edge_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key
        for key in ("loss", "edge_loss", "server_train_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
        # the same arrays travel, but the Message API's features zstd-compressed (the
        # legacy client sends whole arrays): fewer bytes up, the same results
        assert theirs["bytes_up"] * 1.3 < ours["bytes_up"]
        assert ours["bytes_down"] == pytest.approx(theirs["bytes_down"], rel=0.01)
