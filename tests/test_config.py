try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
from flower_processes import REPO

from flwr_fedgkt.settings import ConfigError, RunConfig


def test_pyproject_run_config_matches_the_typed_defaults() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert sorted(table) == sorted(RunConfig.keys())
    assert RunConfig.from_mapping(table, strict=True) == RunConfig()


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match="feature-dtype"):
        RunConfig.from_mapping({"feature-dtype": "float8"})
    with pytest.raises(ConfigError, match="num-server-rounds"):
        RunConfig.from_mapping({"num-server-rounds": 0})
    with pytest.raises(ConfigError, match="batch-size"):
        RunConfig.from_mapping({"batch-size": "many"})
    with pytest.raises(ConfigError, match="unknown run-config keys: epochs"):
        RunConfig.from_mapping({"epochs": 3}, strict=True)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(True, True), (False, False), ("true", True), ("false", False), ("0", False), (1, True)],
)
def test_booleans_parse_by_their_meaning_not_by_truthiness(raw, expected) -> None:
    assert RunConfig.from_mapping({"freeze-extractor": raw}).freeze_extractor is expected


def test_a_boolean_that_is_no_boolean_is_named() -> None:
    with pytest.raises(ConfigError, match="freeze-extractor"):
        RunConfig.from_mapping({"freeze-extractor": "sometimes"})
