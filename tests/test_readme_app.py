"""The Flower app code of the README ("Use FedGKT in your own Flower app") and of
the documentation's "Your own Flower app" runs as written: each ServerApp's main
drives its ClientApp's handlers on two nodes (messages handed over in process),
trains past chance and saves the final model; the documentation's cut example
reports the feature shape it states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from flower_processes import REPO
from inprocess import HandlerGrid, server_context

pytestmark = pytest.mark.usefixtures("one_thread")

README_SECTION = "## Use FedGKT in your own Flower app"


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    """The ```python blocks of a Markdown file, or of one of its ``## `` sections."""
    text = path.read_text()
    if section is not None:
        text = text.split(section, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def block_with(blocks: list[str], marker: str) -> str:
    """The one block that contains ``marker``."""
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} python blocks contain {marker!r}"
    return found[0]


APPS = {
    "README.md": python_blocks(REPO / "README.md", README_SECTION),
    "docs/own-app.md": python_blocks(REPO / "docs" / "own-app.md"),
}
CUT_EXAMPLE = block_with(python_blocks(REPO / "docs" / "models.md"), "cut_model(")


def _run(code: str, source: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, source, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("source", sorted(APPS))
def test_the_server_and_client_apps_train_together(
    source, task_identity, tmp_path, monkeypatch
) -> None:
    # Prepare: the page's ServerApp and ClientApp code blocks, as written
    blocks = APPS[source]
    server = _run(block_with(blocks, "ServerApp()"), source)
    client = _run(block_with(blocks, "ClientApp()"), source)
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
    torch.manual_seed(0)  # the page's models draw from the global RNG
    # Execute
    server["main"](grid, context)
    # Assert: five rounds, no reply rejected or failed, far past chance (0.1)
    rounds = history[0]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    for record in rounds:
        assert record["rejected_replies"] == [] and record["failed_nodes"] == [], record
    assert rounds[-1]["accuracy"] > 0.6, [r["accuracy"] for r in rounds]
    assert rounds[1]["bytes_down"] > 0  # server logits went back for KD
    # ... and the final model loads back into the page's server model
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(saved) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert saved["2.weight"].shape == (10, 128)


def test_the_cut_example_states_the_feature_shape_it_gets() -> None:
    namespace = _run(CUT_EXAMPLE, "docs/models.md")
    assert namespace["pair"].feature_shape == (64, 8, 8)
    assert "(64, 8, 8)" in CUT_EXAMPLE
