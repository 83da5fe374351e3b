"""The run configuration: typed, defaulted and validated.

Flower hands apps the ``[tool.flwr.app.config]`` table (plus ``--run-config``
overrides) as a flat mapping of kebab-case keys. :meth:`RunConfig.from_mapping`
turns it into a typed object and names any key that is wrong.

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .compression import COMPRESSIONS
from .data import DATASET_NAMES, PARTITIONERS
from .features import FEATURE_DTYPES
from .models import COMPACT, EDGE_MODEL, SERVER_MODELS
from .precision import PRECISIONS

__all__ = ["RunConfig", "ConfigError", "boolean"]


class ConfigError(ValueError):
    """A run-config value is missing or invalid."""


def boolean(raw: Any) -> bool:
    """A TOML boolean, or its spelling as text (``true``/``false``, ``1``/``0``,
    ``yes``/``no``); ValueError for anything else (``bool("false")`` is True)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True)
class RunConfig:
    """All run-config keys, with their defaults (the attribute names are the keys
    with ``-`` replaced by ``_``)."""

    num_server_rounds: int = 8
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2
    dataset: str = "digits"
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    min_partition_size: int = 10
    data_dir: str = ""
    synthetic_samples_per_node: int = 0
    batch_size: int = 32
    server_batch_size: int = 64
    client_epochs: int = 1
    server_epochs: int = 1
    client_lr: float = 0.001
    server_lr: float = 0.003
    temperature: float = 3.0
    alpha: float = 1.0
    feature_dtype: str = "int8"
    server_model: str = "resnet55"
    seed: int = 42
    output_dir: str = ""
    device: str = "auto"
    precision: str = "auto"
    round_timeout: float = 3600.0
    max_reply_bytes: int = 0
    max_staleness: int = -1
    max_idle_rounds: int = 3
    feature_store: str = "memory"
    freeze_extractor: bool = False
    freeze_after: int = -1
    compact_features: bool = False
    pipeline: bool = False
    compression: str = "zstd"
    shared_extractor_init: bool = False
    max_feature_abs: float = 1e4
    resume_from: str = ""
    client_state_dir: str = ""

    @property
    def edge_model_name(self) -> str:
        """The built-in edge model: ``resnet8``, or ``resnet8-compact`` with
        ``compact-features``."""
        return EDGE_MODEL + (COMPACT if self.compact_features else "")

    @property
    def server_model_name(self) -> str:
        """The built-in server model: ``server-model``, with ``-compact`` for
        ``compact-features``."""
        return self.server_model + (COMPACT if self.compact_features else "")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], strict: bool = False) -> RunConfig:
        """Build from run-config keys; unknown keys are ignored unless ``strict``."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        if strict:
            unknown = sorted(set(mapping) - set(known))
            if unknown:
                raise ConfigError(f"unknown run-config keys: {', '.join(unknown)}")
        values: dict[str, Any] = {}
        defaults = cls()
        for key, f in known.items():
            if key not in mapping:
                continue
            raw = mapping[key]
            default = getattr(defaults, f.name)
            try:
                if isinstance(default, bool):
                    value: Any = boolean(raw)
                elif isinstance(default, int):
                    if isinstance(raw, float) and not raw.is_integer():
                        raise ValueError
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"run-config {key!r} = {raw!r} is not a valid {type(default).__name__}"
                ) from None
            values[f.name] = value
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, as in ``pyproject.toml``."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(
                f"run-config {key!r} = {getattr(self, key.replace('-', '_'))!r}: {why}"
            )

        if self.num_server_rounds < 1:
            fail("num-server-rounds", "must be at least 1")
        for key in ("fraction-train", "fraction-evaluate"):
            if not 0.0 <= getattr(self, key.replace("-", "_")) <= 1.0:
                fail(key, "must lie in [0, 1]")
        for key in ("batch-size", "server-batch-size"):
            if getattr(self, key.replace("-", "_")) < 2:
                fail(key, "must be at least 2")
        for key in (
            "client-epochs",
            "server-epochs",
            "min-train-nodes",
            "min-evaluate-nodes",
            "min-available-nodes",
        ):
            if getattr(self, key.replace("-", "_")) < 0:
                fail(key, "must not be negative")
        for key in ("client-lr", "server-lr", "temperature", "dirichlet-alpha", "round-timeout"):
            if getattr(self, key.replace("-", "_")) <= 0:
                fail(key, "must be positive")
        if self.alpha < 0:
            fail("alpha", "must not be negative")
        if self.feature_dtype not in FEATURE_DTYPES:
            fail("feature-dtype", f"expected one of {', '.join(FEATURE_DTYPES)}")
        if self.server_model not in SERVER_MODELS:
            fail("server-model", f"expected one of {', '.join(SERVER_MODELS)}")
        if self.max_reply_bytes < 0:
            fail("max-reply-bytes", "must not be negative (0: no limit)")
        if not self.max_feature_abs > 0:
            fail("max-feature-abs", "must be positive")
        if self.max_idle_rounds < 0:
            fail("max-idle-rounds", "must not be negative (0: never stop)")
        if self.max_staleness < -1:
            fail("max-staleness", "must be -1 (no limit) or a number of rounds")
        if self.precision not in PRECISIONS:
            fail("precision", f"expected one of {', '.join(PRECISIONS)}")
        if self.compression not in COMPRESSIONS:
            fail("compression", f"expected one of {', '.join(COMPRESSIONS)}")
        if self.freeze_after < -1:
            fail("freeze-after", "must be -1 (never) or a number of rounds")
        if self.freeze_extractor and self.freeze_after >= 0:
            fail(
                "freeze-after",
                "set freeze-after or freeze-extractor (frozen from the start, i.e. "
                "freeze-after = 0), not both",
            )
        if self.feature_store not in ("memory", "disk"):
            fail("feature-store", "expected memory or disk")
        if self.dataset not in DATASET_NAMES:
            fail("dataset", f"expected one of {', '.join(DATASET_NAMES)}")
        if self.partitioner not in PARTITIONERS:
            fail("partitioner", f"expected one of {', '.join(PARTITIONERS)}")
        if self.classes_per_partition < 1:
            fail("classes-per-partition", "must be at least 1")
        if self.synthetic_samples_per_node < 0 or self.synthetic_samples_per_node == 1:
            fail(
                "synthetic-samples-per-node",
                "must be 0 (600 samples in all) or at least 2 (one to train, one to test)",
            )
        if self.min_partition_size < 0:
            fail("min-partition-size", "must not be negative")
        if self.data_dir and not os.path.isabs(os.path.expanduser(self.data_dir)):
            fail("data-dir", "must be an absolute path (apps may run in other directories)")
