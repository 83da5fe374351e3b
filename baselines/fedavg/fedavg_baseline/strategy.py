"""Flower's FedAvg, metered: bytes on the wire per round and node, and one record
per round in the same shape as FedGKT's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore import log

from flwr_fedgkt.accounting import ByteLedger
from flwr_fedgkt.budget import BudgetSpent, TimeBudget

__all__ = ["MeteredFedAvg"]

RoundRecord = dict[str, Any]


class MeteredFedAvg(FedAvg):
    """:class:`flwr.serverapp.strategy.FedAvg` that counts what it sends and receives.

    Aggregation, sampling and reply validation are FedAvg's own. On top, every
    message sent (``down``) and every reply received (``up``) is counted with
    :func:`flwr_fedgkt.accounting.content_bytes` (its ArrayRecords'
    ``count_bytes()``, as FedGKT's strategy counts), per node and per phase, and
    each round ends with a record like FedGKT's: ``round``, ``accuracy``, ``loss``,
    ``edge_accuracy`` (the same full model: the edge trains it), ``bytes_up``,
    ``bytes_down`` (all messages of the round, training and evaluation), their
    ``_train`` / ``_evaluate`` parts, ``per_client`` bytes, ``seconds``, a
    ``profile`` of the round's seconds (the phases' waits, the aggregation, the
    nodes' reported seconds) and more.

    Parameters
    ----------
    lr_for_round : Callable[[int], float] | None (default: None)
        When given, each round's training config carries ``client-lr`` =
        ``lr_for_round(server_round)`` (a learning-rate schedule).
    on_round_end : Callable[[dict], None] | None (default: None)
        Called with each round's record once its evaluation is aggregated.
    time_budget : float (default: 0.0)
        No round starts after this many seconds from the first (0: no limit).
    **kwargs
        Passed to :class:`~flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ...).
    """

    def __init__(
        self,
        lr_for_round: Callable[[int], float] | None = None,
        on_round_end: Callable[[RoundRecord], None] | None = None,
        time_budget: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.budget = TimeBudget(time_budget)
        self.lr_for_round = lr_for_round
        self.on_round_end = on_round_end
        self.ledger = ByteLedger()
        self.history: list[RoundRecord] = []
        self._round: RoundRecord = {}
        self._sent_at = 0.0  # when the newest phase's messages were handed to Flower

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        super().summary()
        log(INFO, "\t└──> Metering: ArrayRecord bytes per round, node, direction and phase")

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages (the global model to every sampled node), counted."""
        self.budget.check()  # BudgetSpent: no further round
        self._round = {
            "round": server_round,
            "started": time.perf_counter(),
            "failed_nodes": [],
        }
        if self.lr_for_round is not None:
            config["client-lr"] = float(self.lr_for_round(server_round))
            self._round["client_lr"] = config["client-lr"]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            self.ledger.add_content(
                server_round, msg.metadata.dst_node_id, "down", "train", msg.content
            )
        self._sent_at = time.perf_counter()
        return messages

    def _spent(self, part: str, seconds: float) -> None:
        """Add ``seconds`` to the round's ``profile`` (FedGKT's parts, where they apply)."""
        profile = self._round.setdefault("profile", {})
        profile[part] = profile.get(part, 0.0) + float(seconds)

    def _node_seconds(self, replies: list[Message], phase: str) -> None:
        """The seconds the nodes report, summed into the round's profile."""
        for msg in replies:
            if msg.has_error():
                continue
            for record in msg.content.metric_records.values():
                for metric, part in (("edge-train-seconds", "node_train"), ("node-seconds", "")):
                    value = record.get(metric)
                    if isinstance(value, (int, float)) and 0 <= value < 1e7:
                        name = part or ("node_handler" if phase == "train" else "node_evaluate")
                        self._spent(name, float(value))

    def _count_replies(self, server_round: int, replies: list[Message], phase: str) -> None:
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                self._round["failed_nodes"].append(
                    {"node_id": node_id, "phase": phase, "reason": msg.error.reason}
                )
                continue
            self.ledger.add_content(server_round, node_id, "up", phase, msg.content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted average of the replies' models, with the replies counted."""
        self._spent("train_wait", time.perf_counter() - self._sent_at)
        began = time.perf_counter()
        replies = list(replies)
        self._count_replies(server_round, replies, "train")
        self._node_seconds(replies, "train")
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._spent("aggregate", time.perf_counter() - began)
        self._round["train_nodes"] = sum(1 for msg in replies if not msg.has_error())
        if metrics is not None:
            self._round["train_samples"] = _num_examples(replies, self.weighted_by_key)
            self._round["train_loss"] = _get(metrics, "train_loss")
            self._round["train_accuracy"] = _get(metrics, "train_accuracy")
        return arrays, metrics

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation messages (the global model again), counted."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        for msg in messages:
            self.ledger.add_content(
                server_round, msg.metadata.dst_node_id, "down", "evaluate", msg.content
            )
        self._sent_at = time.perf_counter()
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """FedAvg's weighted average of the nodes' test scores; closes the round record."""
        self._spent("evaluate_wait", time.perf_counter() - self._sent_at)
        replies = list(replies)
        self._count_replies(server_round, replies, "evaluate")
        self._node_seconds(replies, "evaluate")
        metrics = super().aggregate_evaluate(server_round, replies)
        accuracy = _get(metrics, "accuracy")
        loss = _get(metrics, "loss")
        record = self._round
        record.update(
            {
                "accuracy": accuracy,
                "loss": loss,
                "edge_accuracy": accuracy,
                "edge_loss": loss,
                "eval_nodes": sum(1 for msg in replies if not msg.has_error()),
                "eval_samples": _num_examples(replies, self.weighted_by_key),
                **self.ledger.round_totals(server_round),
                "per_client": self.ledger.per_client(server_round),
            }
        )
        record["seconds"] = time.perf_counter() - record.pop("started", time.perf_counter())
        # since the first round began, as FedGKT's records count
        record["wall_seconds"] = time.monotonic() - (self.budget.began or time.monotonic())
        self.history.append(record)
        log(
            INFO,
            "round %d: accuracy %s | up %.2f MB | down %.2f MB | round %.1fs",
            server_round,
            "n/a" if accuracy is None else f"{accuracy:.4f}",
            record["bytes_up"] / 1e6,
            record["bytes_down"] / 1e6,
            record["seconds"],
        )
        if self.on_round_end is not None:
            self.on_round_end(record)
        return metrics

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """FedAvg's rounds, until the last or until the time budget is spent."""
        try:
            return super().start(*args, **kwargs)
        except BudgetSpent as spent:
            log(INFO, "The run ends: %s", spent)
            return Result()


def _get(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])  # type: ignore[arg-type]


def _num_examples(replies: list[Message], key: str) -> int:
    total = 0
    for msg in replies:
        if msg.has_error():
            continue
        for record in msg.content.metric_records.values():
            total += int(record.get(key, 0))  # type: ignore[arg-type]
    return total
