"""The legacy-API example app end to end on Flower's simulation engine, through
``flwr run``, and against the Message-API app on the same seed and data."""

import json
from pathlib import Path

import pytest
from flower_processes import REPO, flower_environment, flwr_run, start_local_superlink

pytestmark = pytest.mark.e2e

LEGACY_APP = REPO / "examples" / "legacy-api"
RUN_CONFIG = (
    "num-server-rounds=2 dataset='synthetic' server-epochs=2 batch-size=16 client-epochs=1 "
    "feature-dtype='float16' seed=1 output-dir='{out}'"
)
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
def federation(tmp_path_factory):
    """One private FLWR_HOME and local SuperLink for the module's runs."""
    home = tmp_path_factory.mktemp("flower")
    with flower_environment(home) as env:
        start_local_superlink(env, home / "superlink.log")
        yield env, home


def _run(federation, app: Path, name: str) -> tuple[dict, str]:
    env, home = federation
    out = home / name
    result = flwr_run(env, app, RUN_CONFIG.format(out=out), num_supernodes=2)
    assert result.returncode == 0, result.stdout[-4000:]
    assert (out / "results.json").exists(), result.stdout[-4000:]
    return json.loads((out / "results.json").read_text()), result.stdout


@pytest.fixture(scope="module")
def legacy_run(federation) -> tuple[dict, str]:
    return _run(federation, LEGACY_APP, "legacy")


@pytest.fixture(scope="module")
def message_run(federation) -> tuple[dict, str]:
    return _run(federation, REPO, "message")


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


def test_legacy_and_message_api_apps_give_the_same_results(legacy_run, message_run) -> None:
    # Prepare / Execute: the same run config (seed, data, partitions) on both faces
    legacy, _ = legacy_run
    message, _ = message_run

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
        # the same arrays travel; only the envelopes differ
        assert ours["bytes_up"] == pytest.approx(theirs["bytes_up"], rel=0.01)
        assert ours["bytes_down"] == pytest.approx(theirs["bytes_down"], rel=0.01)
