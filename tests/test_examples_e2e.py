"""The example apps end to end: ``examples/quickstart-pytorch-fedgkt`` and
``examples/custom-models``, each run through ``flwr run`` on Flower's simulation
engine with 2 nodes and a couple of rounds.

Each run must exit cleanly (Flower's ``flwr run`` returns 0 even when the ServerApp
raised, so its log is read too), write one record per round to ``results.json``,
beat chance clearly, and save a final server model that loads into a fresh server
model of the example.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flower_processes import REPO, flwr_run

pytestmark = pytest.mark.e2e

ROUNDS = 2
NODES = 2
SEED = 42  # both examples' default seed, which also initialises the server model
CHANCE = 0.1  # ten digit classes


@dataclass(frozen=True)
class Example:
    folder: str
    package: str
    server_model: str  # the name of the server model's class in task.py

    @property
    def app(self) -> Path:
        return REPO / "examples" / self.folder


EXAMPLES = [
    Example("quickstart-pytorch-fedgkt", "pytorch_fedgkt", "ServerNet"),
    Example("custom-models", "custom_models", "ServerMLP"),
]


@dataclass
class ExampleRun:
    example: Example
    result: subprocess.CompletedProcess
    output_dir: Path

    @property
    def log(self) -> str:
        return self.result.stdout[-4000:]

    def results(self) -> dict:
        path = self.output_dir / "results.json"
        assert path.exists(), self.log
        return json.loads(path.read_text())


def load_task(example: Example) -> ModuleType:
    """The example's ``task.py``, imported by path under a name of its own."""
    name = f"_example_task_{example.package}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, example.app / example.package / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=EXAMPLES, ids=[e.folder for e in EXAMPLES])
def example_run(request, flower_federation) -> ExampleRun:
    """One ``flwr run`` of the example, with a tiny run config, for all its tests."""
    example: Example = request.param
    env, home = flower_federation
    output_dir = home / f"example-{example.folder}"
    run_config = f"num-server-rounds={ROUNDS} output-dir='{output_dir}'"
    result = flwr_run(env, example.app, run_config, num_supernodes=NODES, timeout=300)
    return ExampleRun(example, result, output_dir)


def test_example_run_exits_cleanly(example_run: ExampleRun) -> None:
    # Prepare / Execute: the example's run (fixture)
    result = example_run.result
    # Assert: exit code 0, and no error in the log (the ServerApp's errors only show there)
    assert result.returncode == 0, example_run.log
    assert "Exit Code" not in result.stdout, example_run.log
    assert "Traceback" not in result.stdout, example_run.log
    assert f"[ROUND {ROUNDS}/{ROUNDS}]" in result.stdout, example_run.log


def test_example_writes_one_record_per_round_and_beats_chance(example_run: ExampleRun) -> None:
    # Prepare / Execute: the example's run (fixture)
    results = example_run.results()
    # Assert
    assert results["run_config"]["num-server-rounds"] == ROUNDS
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), rounds
    for record in rounds:
        assert record["bytes_up"] > 0, record
        assert record["rejected_replies"] == [], record
        assert record["failed_nodes"] == [], record
        assert record["train_nodes"] == NODES and record["eval_nodes"] == NODES, record
    assert rounds[-1]["bytes_down"] > 0  # each node got its own server logits back
    last = rounds[-1]
    assert last["accuracy"] > CHANCE + 0.2, last  # the server model on test features
    assert last["edge_accuracy"] > CHANCE + 0.2, last  # the edge models on their own


def test_example_final_model_loads_into_a_fresh_server_model(example_run: ExampleRun) -> None:
    # Prepare: the example's own server model, initialised as its ServerApp does
    task = load_task(example_run.example)
    server_class = getattr(task, example_run.example.server_model)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        initial = server_class()
    model = server_class()
    path = example_run.output_dir / "final_model.pt"
    assert path.exists(), example_run.log
    # Execute
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(torch.rand(5, *task.FEATURE_SHAPE))
    # Assert: it maps features to ten finite logits, and it is the trained model
    assert logits.shape == (5, task.NUM_CLASSES)
    assert torch.isfinite(logits).all()
    trained = any(not torch.equal(value, initial.state_dict()[key]) for key, value in state.items())
    assert trained, "final_model.pt holds the untrained server model"
