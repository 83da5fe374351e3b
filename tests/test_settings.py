"""Every option is written once (flwr_fedgkt.settings.Settings): pyproject's run
config, the documentation's option table and the defaults of every layer (the
strategies, the client, the server trainer, the round engine, the edge settings)
must agree with it."""

from __future__ import annotations

import importlib.util
import inspect
import re
import tomllib
from dataclasses import fields

import pytest
from flower_processes import REPO

from flwr_fedgkt.asynchronous import AsyncFedGKT
from flwr_fedgkt.client import FedGKTClient
from flwr_fedgkt.node import EdgeSettings
from flwr_fedgkt.rounds import RoundEngine
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import DEFAULTS, ConfigError, Settings, option_table
from flwr_fedgkt.strategy import FedGKT

# Each layer's parameter name -> the option it takes its default from
SHARED = {
    FedGKT: {
        "server_epochs": "server_epochs",
        "feature_dtype": "feature_dtype",
        "fraction_train": "fraction_train",
        "fraction_evaluate": "fraction_evaluate",
        "min_train_nodes": "min_train_nodes",
        "min_evaluate_nodes": "min_evaluate_nodes",
        "min_available_nodes": "min_available_nodes",
        "max_reply_bytes": "max_reply_bytes",
        "freeze_extractor": "freeze_extractor",
        "compression": "compression",
        "max_feature_abs": "max_feature_abs",
        "max_logit_abs": "max_logit_abs",
        "seed": "seed",
        "query_timeout": "query_timeout",
        "max_idle_rounds": "max_idle_rounds",
        "time_budget": "time_budget",
    },
    AsyncFedGKT: {
        "eval_every": "eval_every",
        "checkpoint_every": "checkpoint_every",
        "max_logit_age": "max_logit_age",
    },
    RoundEngine: {
        "server_epochs": "server_epochs",
        "feature_dtype": "feature_dtype",
        "max_reply_bytes": "max_reply_bytes",
        "freeze_extractor": "freeze_extractor",
        "compression": "compression",
        "max_feature_abs": "max_feature_abs",
        "max_logit_abs": "max_logit_abs",
        "seed": "seed",
        "max_idle_rounds": "max_idle_rounds",
    },
    ServerTrainer: {
        "model_name": "server_model",
        "lr": "server_lr",
        "batch_size": "server_batch_size",
        "temperature": "temperature",
        "alpha": "alpha",
        "seed": "seed",
        "device": "device",
        "precision": "precision",
    },
    FedGKTClient: {
        "epochs": "client_epochs",
        "lr": "client_lr",
        "batch_size": "batch_size",
        "temperature": "temperature",
        "alpha": "alpha",
        "freeze_extractor": "freeze_extractor",
        "device": "device",
        "seed": "seed",
        "precision": "precision",
        "feature_noise": "feature_noise",
        "feature_clip": "feature_clip",
        "label_epsilon": "label_epsilon",
        "nopeek_weight": "nopeek_weight",
    },
    EdgeSettings: {
        "epochs": "client_epochs",
        "lr": "client_lr",
        "batch_size": "batch_size",
        "temperature": "temperature",
        "alpha": "alpha",
    },
}
# Options whose "unset" is spelled None in the API and -1 in the run config
NONE_IS_MINUS_ONE = {"max_staleness", "freeze_after"}


def _disagreements(layer, names: dict[str, str], defaults: Settings) -> list[str]:
    params = inspect.signature(layer).parameters
    wrong = []
    for param, option in names.items():
        assert param in params, f"{layer.__name__} has no parameter {param!r}"
        if params[param].default != getattr(defaults, option):
            wrong.append(f"{layer.__name__}.{param}={params[param].default!r}")
    for option in NONE_IS_MINUS_ONE & set(params):
        if getattr(defaults, option) == -1 and params[option].default is not None:
            wrong.append(f"{layer.__name__}.{option}={params[option].default!r}")
    return wrong


@pytest.mark.parametrize("layer", list(SHARED), ids=lambda layer: layer.__name__)
def test_every_layer_takes_the_settings_defaults(layer) -> None:
    # Execute
    wrong = _disagreements(layer, SHARED[layer], DEFAULTS)
    # Assert
    assert wrong == []


def test_a_layer_default_that_disagrees_is_caught() -> None:
    # Prepare: the settings as they would be if one option's default changed
    changed = Settings(seed=DEFAULTS.seed + 1, feature_dtype="float16")
    # Execute
    wrong = _disagreements(FedGKT, SHARED[FedGKT], changed)
    # Assert
    assert sorted(wrong) == ["FedGKT.feature_dtype='int8'", "FedGKT.seed=42"]


def test_the_legacy_strategy_takes_the_settings_defaults() -> None:
    # Prepare
    from flwr_fedgkt.legacy import LegacyFedGKT

    params = inspect.signature(LegacyFedGKT).parameters
    # Execute
    wrong = [
        name
        for name in (
            "fraction_train",
            "fraction_evaluate",
            "min_train_nodes",
            "min_evaluate_nodes",
            "min_available_nodes",
            "query_timeout",
        )
        if name in params and params[name].default != getattr(DEFAULTS, name)
    ]
    # Assert: its other options go to the round engine, whose defaults are checked above
    assert wrong == []


def test_pyproject_run_config_is_the_settings_defaults() -> None:
    # Prepare
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Execute
    expected = DEFAULTS.to_dict()
    # Assert: the same keys, the same values
    assert sorted(table) == sorted(expected)
    assert {k: v for k, v in table.items() if expected[k] != v} == {}


def _without_link_targets(row: str) -> str:
    return re.sub(r"\]\([^)]*\)", "]()", row)


def test_docs_option_table_is_generated_from_the_settings() -> None:
    # Prepare: the run-configuration page as written, and the site's hooks
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (REPO / "docs" / "configuration.md").read_text()
    # Execute: what MkDocs renders from it
    rendered = hooks.on_page_markdown(page, page=None, config=None, files=None)
    # Assert: the page holds the marker and no table written by hand ...
    assert page.count(hooks.OPTION_TABLE) == 1
    assert "| key | default | meaning |" not in page
    # ... and renders option_table(), row for row in the settings' order, its
    # links only pointing to this site's pages
    lines = rendered.splitlines()
    start = lines.index("| key | default | meaning |")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]
    expected = option_table().splitlines()
    assert [_without_link_targets(row) for row in table] == [
        _without_link_targets(row) for row in expected
    ]
    assert hooks.OPTION_TABLE not in rendered and "](#" not in "\n".join(table)


def test_every_option_has_one_line_of_documentation() -> None:
    # Execute
    docs = {f.name: f.metadata.get("doc", "") for f in fields(Settings)}
    # Assert
    assert all(doc and "\n" not in doc for doc in docs.values()), docs


def test_a_bad_option_value_is_named() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="'query-timeout' = -1.0: must be positive"):
        Settings.from_mapping({"query-timeout": -1.0})


def test_a_round_timeout_below_the_query_timeout_caps_the_key_query() -> None:
    # Prepare: a run config that shortens only the round timeout (its
    # query-timeout, 300 s by default, comes from pyproject.toml all the same)
    config = Settings.from_mapping({"round-timeout": 60.0, "query-timeout": 300.0})
    # Execute
    strategy = FedGKT.from_run_config(config, 10)
    # Assert: valid, and the key query waits no longer than a round
    assert strategy.query_timeout == 60.0
