"""A legacy-API app of a user's own (``tests/apps/legacy_own``) end to end on
Flower's simulation engine, through ``flwr run``: ``client_fn`` returns
``FedGKTNumPyClient`` with the app's own edge model on flwr-datasets dict items
(the 8x8 digits), ``server_fn`` returns ``LegacyFedGKT`` with the app's own server
model and ``FedAvg``'s argument names."""

import json
import math

import pytest
from flower_processes import REPO, flwr_run
from inprocess import node_context

from flwr_fedgkt.legacy import FedGKTNumPyClient

pytestmark = pytest.mark.e2e

APP = REPO / "tests" / "apps" / "legacy_own"
NODES = 2
ROUNDS = 2
DIGITS = 1797  # scikit-learn's 8x8 digits, all of them split among the nodes
CLASSES = 10
# the app's models by their layer sizes (weights + biases):
# EdgeMLP: Linear(64, 32) extractor, Linear(32, 10) head
EDGE_PARAMS = (64 * 32 + 32) + (32 * 10 + 10)
# ServerMLP: Linear(32, 128), Linear(128, 10)
SERVER_PARAMS = (32 * 128 + 128) + (128 * 10 + 10)


@pytest.fixture(scope="module")
def legacy_own_run(flower_federation) -> tuple[str, int, dict, list[dict]]:
    """The app's run: output, return code, results.json and the nodes' edge-model
    reports."""
    env, home = flower_federation
    out = home / "legacy-own"
    result = flwr_run(env, APP, f"output-dir='{out}'", num_supernodes=NODES)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    reports = [json.loads(report.read_text()) for report in sorted(out.glob("edge-model-*.json"))]
    return result.stdout, result.returncode, results, reports


def test_the_run_completes_two_rounds(legacy_own_run) -> None:
    # Prepare / Execute: the app, two rounds on two simulated nodes
    stdout, returncode, results, _ = legacy_own_run
    # Assert: a ServerApp that raises still exits 0, so its output is read too
    assert returncode == 0, stdout[-4000:]
    assert "Exit Code" not in stdout and "Traceback" not in stdout, stdout[-4000:]
    assert results["status"] == "completed", stdout[-4000:]
    assert results["flower_api"] == "legacy"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert f"round {ROUNDS}: accuracy" in stdout


def test_the_nodes_train_the_apps_own_edge_model(legacy_own_run) -> None:
    # Prepare / Execute
    stdout, _, results, reports = legacy_own_run
    # Assert: each node built the app's EdgeMLP (not the built-in ResNet-8), and
    # results.json names the app's models
    assert reports == [{"name": "EdgeMLP", "params": EDGE_PARAMS}] * NODES, stdout[-4000:]
    assert results["edge_model"] == {"name": "EdgeMLP", "params": EDGE_PARAMS}
    assert results["server_model"] == {"name": "ServerMLP", "params": SERVER_PARAMS}


def test_both_nodes_train_and_are_scored_every_round(legacy_own_run) -> None:
    # Prepare / Execute
    _, _, results, _ = legacy_own_run
    # Assert: no reply rejected, no node failed, every digit trained on or tested
    for record in results["rounds"]:
        assert record["rejected_replies"] == [], record["rejected_replies"]
        assert record["failed_nodes"] == [], record["failed_nodes"]
        assert record["train_nodes"] == NODES and record["eval_nodes"] == NODES
        assert record["stored_nodes"] == NODES
        assert record["train_samples"] + record["eval_samples"] == DIGITS
        assert record["bytes_up"] > 0
    assert results["rounds"][1]["bytes_down"] > 0  # each node got its server logits


def test_the_models_learn_the_digits(legacy_own_run) -> None:
    # Prepare / Execute
    _, _, results, _ = legacy_own_run
    # Assert: ten classes, chance is 0.1; the server model is scored on the nodes'
    # test features every round (the legacy strategy takes no evaluate_fn)
    for record in results["rounds"]:
        assert math.isfinite(record["accuracy"]) and math.isfinite(record["loss"])
    last = results["rounds"][-1]
    assert last["accuracy"] > 0.5, last
    assert last["edge_accuracy"] > 0.5, last


def test_the_legacy_client_takes_a_flwr_datasets_partition(task_identity, monkeypatch) -> None:
    # Prepare: the app's own data (a datasets.Dataset of {"img", "label"} items)
    # and edge model, in this process
    monkeypatch.syspath_prepend(str(APP))
    from legacy_own_app.task import FEATURE_SHAPE, EdgeMLP, load_data

    train, test = load_data(0, NODES, seed=7)
    context = node_context(1, 0, NODES, {"seed": 7, "device": "cpu", "batch-size": 32})
    # Execute
    client = FedGKTNumPyClient(context, train, test, edge_model=EdgeMLP)
    arrays, num_examples, _ = client.fit([], {"server-round": 1, "feature-dtype": "float32"})
    # Assert: features of every training item, labels as the dict items hold them
    features, _, labels, ids = arrays
    assert features.shape == (len(train), *FEATURE_SHAPE) and num_examples == len(train)
    assert sorted(ids.tolist()) == list(range(len(train)))
    assert sorted(labels.tolist()) == sorted(train["label"])
