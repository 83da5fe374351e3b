"""The server of asynchronous FedGKT: it trains without pause on what it holds.

:class:`ContinuousServer` runs the server's training in a thread of its own, one
server epoch at a time, over a :class:`~flwr_fedgkt.rounds.RoundEngine`'s store.
Whoever carries the messages (:class:`~flwr_fedgkt.asynchronous.AsyncFedGKT`)
hands it each validated reply (:meth:`ContinuousServer.accept`) and asks it for
a node's next instruction (:meth:`ContinuousServer.instruction`) at once.

What the server trains on at any moment: the newest accepted upload of every
node whose newest upload is at most ``max-staleness`` server epochs old. An
upload that arrives during an epoch joins the store when that epoch ends, so
every epoch trains on one fixed set of features. A *server version* is one server
epoch. After each epoch the training's thread computes every stored node's
server logits with the new version, so a node's next instruction, sent the
moment its reply is in, carries logits at most one version old (of its features
as stored at that epoch's start). A reply computed against logits more than
``max-logit-age`` versions old is stored all the same (its features are valid)
and flagged.

Every ``eval-every`` epochs the model is scored on each node's newest test
upload that the server has trained with (a test upload counts from the end of
the first epoch that began after it arrived, which trained on the features of
the same extractor that came with it, as a round does) and a record is written
(``round`` = the evaluation's index); every ``checkpoint-every`` epochs a
checkpoint. The run ends after ``total_epochs`` epochs or ``time_budget``
seconds, whichever comes first (both checked between epochs).

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checkpoint import save_checkpoint
from .codec import NodeKey
from .recorder import peak_rss_bytes
from .rounds import RoundEngine
from .server import NonFiniteOutput
from .validation import AcceptedReply, ReplyReader

__all__ = ["ContinuousServer", "Instruction"]

logger = logging.getLogger("flwr.fedgkt")

IDLE_WAIT = 0.05
"""Seconds the training thread waits for a first upload when it holds none."""


@dataclass
class Instruction:
    """A node's next training instruction: its number (``server-round``, larger
    than every earlier one: the node restores its newest state), the version
    its server logits come from (None: no logits), the logits, and whether the
    server asks for its test upload."""

    task: int
    logit_version: int | None
    logits: tuple[np.ndarray, np.ndarray] | None
    with_test: bool


@dataclass
class _Period:
    """What happened since the last evaluation."""

    replies: dict[NodeKey, int] = field(default_factory=dict)
    logit_ages: list[int] = field(default_factory=list)
    flagged: int = 0
    epochs: int = 0
    edge: list[tuple[dict[str, float], int]] = field(default_factory=list)  # metrics, samples


class ContinuousServer:
    """Trains the engine's server model without pause, one epoch at a time.

    Parameters
    ----------
    engine : RoundEngine
        The store, the server model, validation and the records.
    total_epochs : int
        Server epochs of the whole run (``num-server-rounds`` x ``server-epochs``).
    time_budget : float (default: 0.0)
        Seconds after which the run ends (0: no limit).
    eval_every, checkpoint_every : int (default: 1)
        Server epochs between evaluations, between checkpoints.
    max_logit_age : int | None (default: 4)
        Flag replies computed against older server logits (None: never).
    clock : Callable[[], float] (default: time.monotonic)
        The clock of the time budget.
    """

    # pylint: disable=too-many-instance-attributes
    def __init__(
        self,
        engine: RoundEngine,
        total_epochs: int,
        time_budget: float = 0.0,
        eval_every: int = 1,
        checkpoint_every: int = 1,
        max_logit_age: int | None = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if eval_every < 1 or checkpoint_every < 1:
            raise ValueError("eval_every and checkpoint_every must be at least 1")
        self.engine = engine
        self.total_epochs = total_epochs
        self.time_budget = time_budget
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.max_logit_age = max_logit_age
        self.clock = clock
        self.lock = threading.RLock()
        self.version = engine.version_offset  # server epochs done (before a resume too)
        self.evaluations = engine.round_offset  # records written
        self.error: BaseException | None = None
        self._pending: list[AcceptedReply] = []  # accepted, stored when an epoch begins
        self._pending_tests: list[AcceptedReply] = []  # scored from the end of that epoch
        self._tests: dict[NodeKey, AcceptedReply] = {}  # newest test upload per key
        self._tested: set[NodeKey] = set()  # keys with a test upload since the last record
        self._period = _Period()
        self._task = 0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = 0.0
        self._bad_replies = 0  # failed or rejected replies since the last accepted one
        self.log = engine.begin_round(self.evaluations + 1)

    # -- the run -----------------------------------------------------------------------
    def start(self) -> None:
        """Start training in a background thread."""
        self._began = self.clock()
        self._thread = threading.Thread(target=self._run, name="fedgkt-server", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        """Whether the training has ended (its budget spent, stopped or failed)."""
        return self._done.is_set()

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the training to end; whether it has."""
        return self._done.wait(seconds)

    def stop(self) -> None:
        """End the training after the epoch under way, and wait for it; re-raise
        what the training raised."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error

    def _out_of_budget(self) -> bool:
        if self.version >= self.total_epochs:
            return True
        return bool(self.time_budget) and self.clock() - self._began >= self.time_budget

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self._out_of_budget():
                self.epoch()
            with self.lock:
                if self._period.epochs:  # the epochs since the last record
                    self._evaluate(final=True)
        except BaseException as err:  # re-raised by stop()
            self.error = err
        finally:
            self._done.set()

    def epoch(self) -> bool:
        """One server epoch over the store, with the uploads accepted so far
        stored first; then the record and checkpoint that are due. False (and
        nothing trained) when the store is empty."""
        with self.lock:
            arrived, self._pending = self._pending, []
            # a test upload counts once the server has trained on the training
            # upload that came with it (the same extractor's features), as in a round
            for tested in self._pending_tests:
                self._tests[tested.key] = tested
            self._pending_tests = []
            self.log.cached_feature_nodes += self.engine.step.keep(arrived, self.version)
            self.engine.step.drop_stale(self.version)
        if not len(self.engine.store):
            self._stop.wait(IDLE_WAIT)
            return False
        result = self.engine.trainer.train(self.engine.store, 1)
        refreshed = self._refresh_logits()
        with self.lock:
            self.version += 1
            self._period.epochs += 1
            for key, reason in result.excluded.items():
                self.engine.step.drop(self.log, key, reason, arrived)
            for key, logits in refreshed.items():
                if key in result.excluded or key not in self.engine.store:
                    continue
                if isinstance(logits, str):  # non-finite: never sent
                    self.engine.step.drop(self.log, key, logits, arrived)
                    continue
                self.engine.server_logits[key] = logits
                self.engine.step.logit_versions[key] = self.version
            self._note_epoch(result)
            if self.version % self.eval_every == 0:
                self._evaluate()
            if self.version % self.checkpoint_every == 0:
                self._checkpoint()
        return True

    def _note_epoch(self, result: Any) -> None:
        log = self.log
        log.skipped_server_steps += result.skipped_steps
        log.server_train_seconds += result.seconds
        log.server_threads = sorted(set(log.server_threads) | set(result.threads))
        log.spent("server_train", result.seconds)
        log.server_train_loss = result.loss
        log.server_train_ce = result.ce
        log.server_train_kd = result.kd
        log.server_train_accuracy = result.accuracy
        log.stored_nodes = len(self.engine.store)
        log.stored_samples = self.engine.store.num_samples
        log.stored_feature_bytes = self.engine.store.nbytes
        log.server_peak_rss_bytes = peak_rss_bytes()

    # -- replies and instructions -------------------------------------------------------
    def accept(
        self,
        train: ReplyReader,
        test: ReplyReader | None,
        instruction: Instruction,
    ) -> AcceptedReply | None:
        """Validate a node's reply to ``instruction`` exactly as in rounds (its
        test upload on its own); keep what passes: the training upload for the
        next epoch, the test upload for the records after it. The accepted training
        reply, or None."""
        with self.lock:
            log = self.log
            accepted = self.engine.accept(train, instruction.task, True, log)
            tested = None
            if test is not None:
                tested = self.engine.accept(test, instruction.task, False, log)
            if tested is not None and self.engine.screen(log, [tested], "test"):
                self._pending_tests.append(tested)
                self._tested.add(tested.key)
            if accepted is None or not self.engine.screen(log, [accepted], "train"):
                self._bad_replies += 1
                return None
            self._bad_replies = 0
            age = None
            if instruction.logit_version is not None:
                age = self.version - instruction.logit_version
                self._period.logit_ages.append(age)
                if self.max_logit_age is not None and age > self.max_logit_age:
                    self._period.flagged += 1
                    logger.info(
                        "node key %r: reply computed against server logits %d server epochs "
                        "old (max-logit-age %d); stored, flagged",
                        accepted.key,
                        age,
                        self.max_logit_age,
                    )
            self._period.replies[accepted.key] = self._period.replies.get(accepted.key, 0) + 1
            self._period.edge.append((accepted.metrics, accepted.payload.num_samples))
            self._pending.append(accepted)
            log.train_nodes = len(self._period.replies)
            log.train_samples += accepted.payload.num_samples
            return accepted

    def failure(self, node_id: int, reason: str | None) -> None:
        """A node whose ClientApp failed, that left or that did not reply in time."""
        with self.lock:
            self.engine.recorder.failure(self.log, node_id, reason)
            self._bad_replies += 1

    def instruction(self, key: NodeKey | None) -> Instruction:
        """The next instruction of node key ``key``: the server logits it holds
        for the key (of the newest version: every epoch refreshes them), if any."""
        with self.lock:
            self._task = max(self._task + 1, time.time_ns() // 1_000_000)
            with_test = key is None or key not in self._tested
            held = self.engine.server_logits.get(key) if key is not None else None
            version = None
            if key is not None and held is not None:
                version = self.engine.step.logit_versions.get(key)
            return Instruction(self._task, version, held, with_test)

    def _refresh_logits(self) -> dict[NodeKey, tuple[np.ndarray, np.ndarray] | str]:
        """Server logits of every stored node on its stored features, computed in
        the training's thread right after an epoch (so that nothing else competes
        with the training for its threads): the node's logits, or why not."""
        refreshed: dict[NodeKey, tuple[np.ndarray, np.ndarray] | str] = {}
        began = time.perf_counter()
        for key in self.engine.store.nodes():
            try:
                refreshed[key] = self.engine.trainer.logits_for(self.engine.store, key)
            except NonFiniteOutput as err:
                refreshed[key] = str(err)
        self.log.spent("server_logits", time.perf_counter() - began)
        return refreshed

    # -- records and checkpoints ------------------------------------------------------------
    def _evaluate(self, final: bool = False) -> None:
        """Score the newest version on each node's newest test upload and write
        the record; a new record begins. Before any test upload arrived (a run's
        or a resumed run's first epochs) the record waits, but at the run's end."""
        if not self._tests and not final:
            return
        period, self._period = self._period, _Period()
        log = self.log
        log.server_version = self.version
        log.replies_by_node = dict(period.replies)
        ages = period.logit_ages
        log.staleness = {
            "max_logit_age": self.max_logit_age,
            "flagged": period.flagged,
            "logit_age_mean": float(np.mean(ages)) if ages else None,
            "logit_age_max": int(max(ages)) if ages else None,
            "feature_age_max": max(
                (self.version - self.engine.store.last_round(k) for k in self.engine.store.nodes()),
                default=None,
            ),
            "server_epochs": period.epochs,
        }
        for metric in ("train-loss", "train-ce", "train-kd", "train-accuracy"):
            pairs = [(m[metric], n) for m, n in period.edge if metric in m]
            total = sum(n for _, n in pairs)
            mean = sum(v * n for v, n in pairs) / total if total else None
            setattr(log, f"edge_{metric.replace('-', '_')}", mean)
        # idle: no reply accepted in the record's epochs, and every connected node's
        # last max-idle-rounds replies failed or were rejected
        nodes = max(1, len(self.engine.connected()))
        few_bad = self._bad_replies < self.engine.recorder.max_idle_rounds * nodes
        self.engine.recorder.progress(log, bool(period.replies) or few_bad)
        self._tested = set()
        self.evaluations = log.round
        tests = list(self._tests.values())
        self.engine.close_round(log.round, tests, checkpoint=False, screen=False)
        self.log = self.engine.begin_round(self.evaluations + 1)

    def _checkpoint(self) -> None:
        directory = self.engine.recorder.checkpoint_dir
        if directory is None:
            return
        state = {
            **self.engine.state_dict(),
            "round": self.evaluations,
            "server_version": self.version,
        }
        save_checkpoint(directory, self.version, state)
        self.engine.store.checkpointed()
