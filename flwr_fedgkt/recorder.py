"""The record of the server's rounds: one :class:`RoundLog` per round, the
history, ``on_round_end``, checkpoints and the no-progress rule.

Every method takes the round's log it writes to: a pipelined strategy has two
rounds open at once (one training in the background, the next one validating),
and each keeps its own log.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import re
import resource
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import save_checkpoint

__all__ = [
    "MAX_REASON_CHARS",
    "NoProgressError",
    "RoundLog",
    "RoundRecorder",
    "failure_line",
    "peak_rss_bytes",
]

PROFILE_PARTS = {
    "train_wait": "from the training messages sent to all replies received",
    "evaluate_wait": "the same for evaluation messages (0 when training replies carried the test "
    "uploads)",
    "validate": "checking and decoding the replies",
    "server_train": "server training",
    "server_logits": "server logits for the nodes that replied",
    "score": "scoring the test features",
    "node_train": "the nodes' edge training (the sum over nodes, as they report it)",
    "node_extract": "the nodes' extraction over their training and test data (sum)",
    "node_encode": "the nodes' encoding and compression of their uploads (sum)",
    "node_handler": "the nodes' message handlers from start to reply, all of the above and "
    "restoring and saving their state (sum)",
}
"""The parts of a round's ``profile`` in ``results.json`` (seconds)."""

# Under Flower's logger, so that the round's lines appear in Flower's log
logger = logging.getLogger("flwr.fedgkt")


@dataclass
class RoundLog:
    """One round's record, as written to ``results.json`` (:meth:`to_dict`)."""

    round: int
    bytes_up: int = 0
    bytes_down: int = 0
    cumulative_bytes_up: int = 0
    cumulative_bytes_down: int = 0
    rejected_replies: list[dict[str, Any]] = field(default_factory=list)
    failed_nodes: list[dict[str, Any]] = field(default_factory=list)
    skipped_server_steps: int = 0
    server_train_seconds: float = 0.0
    server_threads: list[int] = field(default_factory=list)  # torch threads it trained with
    server_train_loss: float | None = None
    server_train_ce: float | None = None
    server_train_kd: float | None = None
    server_train_accuracy: float | None = None
    edge_train_loss: float | None = None
    edge_train_ce: float | None = None
    edge_train_kd: float | None = None
    edge_train_accuracy: float | None = None
    edge_precision: dict[str, int] = field(default_factory=dict)
    train_nodes: int = 0
    train_samples: int = 0
    cached_feature_nodes: int = 0
    cached_test_nodes: int = 0
    stored_nodes: int = 0
    stored_samples: int = 0
    stored_feature_bytes: int = 0
    server_peak_rss_bytes: int = 0
    accuracy: float | None = None
    accuracy_median: float | None = None  # the median of node_accuracy
    node_accuracy: dict[str, float] = field(default_factory=dict)  # by node key
    loss: float | None = None
    edge_accuracy: float | None = None
    edge_loss: float | None = None
    eval_nodes: int = 0
    eval_samples: int = 0
    seconds: float = 0.0
    ended_seconds: float = 0.0  # since this process began its first round
    wall_seconds: float = 0.0  # the same: when the record was written
    server_version: int | None = None  # server epochs (async) or rounds done when scored
    replies_by_node: dict[str, int] = field(default_factory=dict)  # stored uploads by node key
    staleness: dict[str, Any] = field(default_factory=dict)  # async: ages of logits, features
    # what left the nodes so far: defences, epsilon (worst node), label flips
    privacy: dict[str, Any] = field(default_factory=dict)
    # where the round's seconds went (PROFILE_PARTS), the nodes' as they report them
    profile: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter, repr=False)

    def spent(self, part: str, seconds: float) -> None:
        """Add ``seconds`` to the round's profile under ``part``."""
        self.profile[part] = self.profile.get(part, 0.0) + float(seconds)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["started"]
        return record


def peak_rss_bytes() -> int:
    """Peak resident memory of this (server) process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout)\w*): (.+)$"
)
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
MAX_REASON_CHARS = 300


class NoProgressError(RuntimeError):
    """No node replied usefully in ``max_idle_rounds`` rounds in a row: the run
    stops (the built-in ServerApp records ``"status": "no-progress"``)."""

    def __init__(self, rounds: int, reasons: Mapping[str, int], fix: str = "") -> None:
        self.rounds = rounds
        self.reasons = dict(reasons)
        if fix:  # one error on every node: it names itself and the fix
            message = f"{fix}: {counted(self.reasons)}"
        else:
            message = f"no node replied usefully in {rounds} rounds in a row: {counted(reasons)}"
        super().__init__(message)


SAME_ERROR_FIX = (
    "every sampled node's ClientApp raised the same error in the run's first round, "
    "which will not go away by itself (its data, its model or its code); fix it and "
    "start the run again"
)


def counted(reasons: Mapping[str, int]) -> str:
    """Reasons with their counts, in one line: ``2x RuntimeError: ...; 1x ...``."""
    return "; ".join(f"{n}x {reason}" for reason, n in reasons.items())


def idle_reasons(log: RoundLog) -> dict[str, int]:
    """The distinct reasons of a round's failures and rejections, with their counts."""
    counts: dict[str, int] = {}
    for entry in [*log.failed_nodes, *log.rejected_replies]:
        reason = str(entry["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def raised_error(line: str) -> bool:
    """Whether a failure line (:func:`failure_line`) is an exception a ClientApp
    raised (``ValueError: ...``), not a timeout or a lost node."""
    match = _EXCEPTION_LINE.match(line)
    return match is not None and not match.group(1).endswith(_WRAPPERS)


def failure_line(reason: str | None) -> str:
    """One readable line for why a node failed: the exception that the ClientApp
    raised (``RuntimeError: ...``), found in the text Flower reports (which may wrap
    it in a Ray actor's repr, a doubled traceback and terminal colour codes); else
    the text's last line. At most :data:`MAX_REASON_CHARS` characters."""
    if not reason:
        return "unknown error"
    text = _ANSI.sub("", reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [
        m.group(0)
        for line in lines
        if (m := _EXCEPTION_LINE.match(line)) and not m.group(1).endswith(_WRAPPERS)
    ]
    line = raised[0] if raised else (lines[-1] if lines else "unknown error")
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class RoundRecorder:
    """Writes the rounds' logs: failures and rejections as they happen, then
    each finished round into the history, ``on_round_end`` and a checkpoint;
    counts the rounds in which no node replied usefully.

    Parameters
    ----------
    on_round_end : Callable[[dict], None] | None
        Called with each finished round's record.
    checkpoint_dir : Path | None
        Where a checkpoint is written after every round; None: none.
    max_idle_rounds : int
        Raise :class:`NoProgressError` after this many idle rounds in a row; 0: never.
    """

    def __init__(
        self,
        on_round_end: Callable[[dict[str, Any]], None] | None,
        checkpoint_dir: Path | None,
        max_idle_rounds: int,
    ) -> None:
        self.on_round_end = on_round_end
        self.checkpoint_dir = checkpoint_dir
        self.max_idle_rounds = max_idle_rounds
        self.history: list[dict[str, Any]] = []
        self.idle_rounds = 0  # rounds in a row in which no node replied usefully
        self.idle_reasons: dict[str, int] = {}
        self.began: float | None = None  # when this process began its first round
        self.same_error = False  # every node raised one error in the first round

    def open(self, server_round: int) -> RoundLog:
        """A new log for round ``server_round`` (at the start of its training)."""
        if self.began is None:
            self.began = time.perf_counter()
        return RoundLog(round=server_round)

    # -- as the round goes -----------------------------------------------------------
    @staticmethod
    def failure(log: RoundLog, node_id: int | None, reason: str | None) -> None:
        """A node whose ClientApp raised or that did not reply in time: the round's
        log gets the reason in one line (:func:`failure_line`), the log the whole
        text once."""
        line = failure_line(reason)
        text = _ANSI.sub("", reason or "")
        if text.strip() != line:
            logger.warning("node %s failed: %s\n%s", node_id, line, text)
        else:
            logger.warning("node %s failed: %s", node_id, line)
        log.failed_nodes.append({"node_id": node_id, "reason": line})

    def missing(self, log: RoundLog, sampled: Collection[int], replied: Collection[int]) -> None:
        """Report sampled nodes that sent nothing back before the round's timeout."""
        for node_id in sorted(set(sampled) - set(replied)):
            self.failure(log, node_id, "no reply within the round's timeout")

    @staticmethod
    def reject(log: RoundLog, node_id: int, key: str | None, reason: str) -> None:
        """A reply that failed validation, or whose node was taken out of the round."""
        logger.warning("rejected reply from node %s: %s", node_id, reason)
        log.rejected_replies.append({"node_id": node_id, "node_key": key, "reason": reason})

    def progress(self, log: RoundLog, useful: bool) -> None:
        """Count the rounds in a row in which no node replied usefully (every sampled
        node failed or was rejected); log their reasons with their counts."""
        if useful or not (log.failed_nodes or log.rejected_replies):
            self.idle_rounds = 0
            return
        self.idle_rounds += 1
        self.idle_reasons = idle_reasons(log)
        reasons = {str(f["reason"]) for f in log.failed_nodes}
        if (
            not self.history  # the run's first round
            and not log.rejected_replies
            and len(reasons) == 1
            and raised_error(next(iter(reasons)))
        ):
            self.same_error = True
        logger.warning(
            "round %d: no node replied usefully (%d round(s) in a row): %s",
            log.round,
            self.idle_rounds,
            counted(self.idle_reasons),
        )

    # -- at the round's end ------------------------------------------------------------
    def close(
        self,
        log: RoundLog,
        state: Callable[[], dict[str, Any]],
        checkpointed: Callable[[], None] | None = None,
        checkpoint: bool = True,
    ) -> dict[str, Any]:
        """Finish round ``log.round``: totals and times, the log line, the history,
        ``on_round_end`` and the checkpoint (of ``state()``, then ``checkpointed()``
        is called; not when ``checkpoint`` is False); then raise
        :class:`NoProgressError` when the run has been idle too long. The record."""
        before = self.history[-1] if self.history else {}
        log.cumulative_bytes_up = before.get("cumulative_bytes_up", 0) + log.bytes_up
        log.cumulative_bytes_down = before.get("cumulative_bytes_down", 0) + log.bytes_down
        log.seconds = time.perf_counter() - log.started
        log.ended_seconds = time.perf_counter() - (self.began or log.started)
        log.wall_seconds = log.ended_seconds
        if log.server_version is None:
            log.server_version = log.round
        record = log.to_dict()
        self.history.append(record)
        logger.info(
            "round %d: accuracy %s | edge accuracy %s | up %.2f MB | down %.2f MB | "
            "server train %.1fs | round %.1fs | rejected %d",
            log.round,
            _fmt(log.accuracy),
            _fmt(log.edge_accuracy),
            log.bytes_up / 1e6,
            log.bytes_down / 1e6,
            log.server_train_seconds,
            log.seconds,
            len(log.rejected_replies),
        )
        if log.privacy.get("defences"):
            epsilon = log.privacy["epsilon"]
            logger.info(
                "round %d privacy: %s | epsilon %s at delta %g over %d releases | label flip %.3f",
                log.round,
                ", ".join(log.privacy["defences"]),
                "unbounded (a release without noise)" if epsilon is None else f"{epsilon:.3g}",
                log.privacy["delta"],
                log.privacy["releases_max"],
                log.privacy["label_flip"],
            )
        if self.on_round_end is not None:
            self.on_round_end(record)
        if checkpoint and self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, log.round, state())
            if checkpointed is not None:
                checkpointed()
        if self.same_error:
            raise NoProgressError(self.idle_rounds, self.idle_reasons, SAME_ERROR_FIX)
        if self.max_idle_rounds and self.idle_rounds >= self.max_idle_rounds:
            raise NoProgressError(self.idle_rounds, self.idle_reasons)
        return record
