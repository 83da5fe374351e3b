"""A run's wall-clock budget, and the ``Result`` of a run that ends before its
last round.

Flower's ``Strategy.start`` runs its rounds to the end; a strategy whose
``time-budget`` is spent raises :class:`BudgetSpent` from ``configure_train``,
and its ``start`` returns the ``Result`` of the rounds done
(:func:`complete_result`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

__all__ = ["BudgetSpent", "TimeBudget", "complete_result"]

TRAIN_METRICS = {
    "num-examples": "train_samples",
    "replies": "train_nodes",
    "server-train-loss": "server_train_loss",
    "server-train-ce": "server_train_ce",
    "server-train-kd": "server_train_kd",
    "server-train-accuracy": "server_train_accuracy",
    "server-train-seconds": "server_train_seconds",
}
"""The training metrics of a ``Result`` entry, from its record."""


class BudgetSpent(Exception):
    """The run's time budget is spent: no further round starts."""


class TimeBudget:
    """``seconds`` of wall-clock time from :meth:`start` (0: no limit)."""

    def __init__(self, seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.began: float | None = None

    def start(self) -> None:
        if self.began is None:
            self.began = self.clock()

    @property
    def spent(self) -> bool:
        return (
            bool(self.seconds)
            and self.began is not None
            and (self.clock() - self.began >= self.seconds)
        )

    def check(self) -> None:
        """Start the clock on first use; raise :class:`BudgetSpent` once it is spent."""
        self.start()
        if self.spent:
            raise BudgetSpent(f"time budget of {self.seconds:g} s spent")


def complete_result(result: Result, strategy: Any, first: int) -> None:
    """Fill ``result`` from the strategy's records from index ``first`` on: the
    final model, each record's training and evaluation metrics (by its
    ``round``, less the rounds done before a resume)."""
    engine = strategy.engine
    result.arrays = strategy.model_arrays()
    for record in engine.history[first:]:
        server_round = int(record["round"]) - engine.round_offset
        result.train_metrics_clientapp[server_round] = MetricRecord(
            {
                key: float(record[field])
                for key, field in TRAIN_METRICS.items()
                if record.get(field) is not None
            }
        )
        if record.get("accuracy") is not None:
            result.evaluate_metrics_clientapp[server_round] = MetricRecord(
                {
                    "num-examples": float(record["eval_samples"]),
                    "accuracy": float(record["accuracy"]),
                    "loss": float(record["loss"]),
                }
            )
