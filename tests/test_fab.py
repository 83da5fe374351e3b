"""The repository root and the paper's baseline are Flower Apps: ``flwr build``
bundles each into a FAB, and every configuration file of the baseline is a run
config the app accepts."""

from __future__ import annotations

import os
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from flower_processes import REPO

from flwr_fedgkt.settings import RunConfig

BASELINE = REPO / "baselines" / "fedgkt"
SETTINGS = [
    f"{dataset}-{partitioner}-{model}"
    for dataset in ("cifar10", "cifar100", "cinic10")
    for partitioner in ("iid", "dirichlet")
    for model in ("resnet56", "resnet110")
]


def _pyproject(app: Path) -> dict:
    with open(app / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def _build(app: Path, where: Path) -> zipfile.ZipFile:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(where / "flwr-home")}
    done = subprocess.run(
        ["flwr", "build", "--app", str(app)],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    fabs = list(where.glob("*.fab"))
    assert done.returncode == 0 and len(fabs) == 1, done.stdout + done.stderr
    return zipfile.ZipFile(fabs[0])


@pytest.mark.parametrize("app", [REPO, BASELINE], ids=["root", "baseline"])
def test_flwr_build_bundles_the_app(app: Path, tmp_path: Path) -> None:
    # Prepare: what a Flower App declares for publishing
    flwr_app = _pyproject(app)["tool"]["flwr"]["app"]
    assert flwr_app["fab-format-version"] == 1 and flwr_app["flwr-version-target"]
    assert any(
        d.startswith("flwr[simulation]>=") for d in _pyproject(app)["project"]["dependencies"]
    )
    # Execute
    names = set(_build(app, tmp_path).namelist())
    # Assert: the app's own files, its licence, nothing of the tests
    assert {"pyproject.toml", "LICENSE", "README.md"} <= names
    if app == REPO:
        assert {"flwr_fedgkt/strategy.py", "flwr_fedgkt/client_app.py"} <= names
    else:
        assert {f"conf/{name}.toml" for name in SETTINGS} <= names
    assert not any(name.startswith("tests/") for name in names)


def test_the_baseline_runs_the_root_app_at_its_defaults() -> None:
    root, baseline = (
        _pyproject(REPO)["tool"]["flwr"]["app"],
        _pyproject(BASELINE)["tool"]["flwr"]["app"],
    )
    assert baseline["components"] == root["components"]
    assert baseline["config"] == root["config"]


@pytest.mark.parametrize("name", SETTINGS)
def test_each_paper_setting_is_a_run_config_of_its_name(name: str) -> None:
    # Prepare
    dataset, partitioner, model = name.split("-")
    with open(BASELINE / "conf" / f"{name}.toml", "rb") as file:
        setting = tomllib.load(file)
    # Execute: the file over the app's defaults, as `flwr run --run-config` merges it
    config = RunConfig.from_mapping(
        {**_pyproject(BASELINE)["tool"]["flwr"]["app"]["config"], **setting}
    )
    # Assert: every key known, the setting the name says
    assert set(setting) <= set(_pyproject(BASELINE)["tool"]["flwr"]["app"]["config"])
    assert (config.dataset, config.partitioner) == (dataset, partitioner)
    assert config.server_model == {"resnet56": "resnet55", "resnet110": "resnet109"}[model]
    if partitioner == "dirichlet":
        assert config.dirichlet_alpha == 0.5
