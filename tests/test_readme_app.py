"""The README's "Use FedGKT in your own Flower app" code runs as written: its
ServerApp's main drives its ClientApp's handlers on two nodes (messages handed
over in process), trains past chance and saves the final model; its cut example
reports the feature shape it states."""

from __future__ import annotations

import re

import pytest
import torch
from flower_processes import REPO
from inprocess import HandlerGrid, server_context

pytestmark = pytest.mark.usefixtures("one_thread")

SECTION = (REPO / "README.md").read_text().split("## Use FedGKT in your own Flower app", 1)[1]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION.split("\n## ", 1)[0], re.S)


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_the_readme_server_and_client_apps_train_together(
    task_identity, tmp_path, monkeypatch
) -> None:
    # Prepare: the README's ServerApp and ClientApp code blocks, as written
    server, client = _run(BLOCKS[0]), _run(BLOCKS[1])
    monkeypatch.chdir(tmp_path)
    grid = HandlerGrid(client, num_nodes=2)
    history: list = []
    original = server["FedGKT"]

    def recording(*args, **kwargs):  # keep the strategy's rounds for the asserts
        strategy = original(*args, **kwargs)
        history.append(strategy.history)
        return strategy

    server["FedGKT"] = recording
    context = server_context()
    torch.manual_seed(0)  # the README's models draw from the global RNG
    # Execute
    server["main"](grid, context)
    # Assert: five rounds, no reply rejected or failed, far past chance (0.1)
    rounds = history[0]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    for record in rounds:
        assert record["rejected_replies"] == [] and record["failed_nodes"] == [], record
    assert rounds[-1]["accuracy"] > 0.6, [r["accuracy"] for r in rounds]
    assert rounds[1]["bytes_down"] > 0  # server logits went back for KD
    # ... and the final model loads back into the README's server model
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert saved["2.weight"].shape == (10, 128)


def test_the_readme_cut_example_states_the_feature_shape_it_gets() -> None:
    namespace = _run(BLOCKS[2])
    assert namespace["pair"].feature_shape == (64, 8, 8)
    assert "(64, 8, 8)" in BLOCKS[2]
