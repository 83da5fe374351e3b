"""The FedAvg baseline's run config: FedGKT's :class:`RunConfig` plus the keys only
FedAvg has (model, optimizer, learning-rate schedule)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr_fedgkt.models import FULL_MODELS
from flwr_fedgkt.settings import ConfigError, RunConfig

__all__ = ["FedAvgConfig", "FULL_MODELS", "OPTIMIZERS", "LR_SCHEDULES"]

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")

# FedAvg defaults (kebab-case key -> value); the shared keys come from RunConfig.
_DEFAULTS: dict[str, Any] = {
    "model": "resnet56",
    "optimizer": "adam",
    "momentum": 0.9,
    "weight-decay": 5e-4,
    "lr-schedule": "cosine",
}


@dataclass(frozen=True)
class FedAvgConfig:
    """The shared :class:`RunConfig` and FedAvg's own settings.

    Attributes
    ----------
    run : RunConfig
        Keys shared with FedGKT (rounds, data set, partitioner, seeds, ``client-lr``,
        ``client-epochs``, ``batch-size``, ...).
    model : str
        ``resnet56`` or ``resnet110``: the full model every node trains.
    optimizer : str
        ``sgd`` (with ``momentum``) or ``adam``; a fresh optimizer every round.
    momentum : float
        SGD momentum.
    weight_decay : float
        L2 weight decay of either optimizer.
    lr_schedule : str
        ``constant``, or ``cosine``: the client learning rate of round ``t`` of ``T``
        is ``lr * (0.05 + 0.95 * (1 + cos(pi * (t - 1) / T)) / 2)``, the same decay to
        5 % that FedGKT's server model follows.
    """

    run: RunConfig
    model: str = "resnet56"
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> FedAvgConfig:
        """Build from run-config keys (unknown keys are ignored)."""
        values = {**_DEFAULTS, **{k: mapping[k] for k in _DEFAULTS if k in mapping}}
        try:
            config = cls(
                run=RunConfig.from_mapping(mapping),
                model=str(values["model"]),
                optimizer=str(values["optimizer"]),
                momentum=float(values["momentum"]),
                weight_decay=float(values["weight-decay"]),
                lr_schedule=str(values["lr-schedule"]),
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"invalid FedAvg run-config: {err}") from None
        config.validate()
        return config

    def validate(self) -> None:
        if self.model not in FULL_MODELS:
            raise ConfigError(
                f"run-config 'model' = {self.model!r}: expected resnet56 or resnet110"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"run-config 'optimizer' = {self.optimizer!r}: expected sgd or adam")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"run-config 'lr-schedule' = {self.lr_schedule!r}: expected constant or cosine"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"run-config 'momentum' = {self.momentum!r}: must lie in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"run-config 'weight-decay' = {self.weight_decay!r}: negative")

    def client_lr(self, server_round: int) -> float:
        """The client learning rate of ``server_round`` (1-based)."""
        lr = self.run.client_lr
        if self.lr_schedule == "constant":
            return lr
        rounds = max(self.run.num_server_rounds, 1)
        progress = min(max(server_round - 1, 0), rounds) / rounds
        return lr * (0.05 + 0.95 * (1.0 + math.cos(math.pi * progress)) / 2.0)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, as in ``pyproject.toml``."""
        return {
            **self.run.to_dict(),
            "model": self.model,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "lr-schedule": self.lr_schedule,
        }
