"""Asynchronous FedGKT: no round barrier, so a slow node never holds the others back.

:class:`AsyncFedGKT` keeps every connected node busy with Flower's Message API
(``Grid.push_messages`` / ``Grid.pull_messages``): each node has one training
instruction out at a time, and as soon as its reply is in, the reply is validated
exactly as in rounds and the node gets its next instruction, with server logits
of the newest server version (at most one epoch old). The server trains
without pause on what it holds (:class:`~flwr_fedgkt.continuous.ContinuousServer`:
one server epoch after another over the store, the uploads that arrived during
an epoch joining it when the epoch ends).

A node joining mid-run gets an instruction within a second; a node that leaves
is forgotten until it comes back; a node whose ClientApp fails, whose reply is
rejected or that does not reply within ``timeout`` is asked again after a pause
that doubles each time (1 s up to 60 s). Every ``eval-every`` server epochs a
record is written (``round`` = the evaluation's index), with ``wall_seconds``,
``server_version``, ``replies_by_node`` and ``staleness``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from .budget import complete_result
from .continuous import ContinuousServer, Instruction
from .grid import GROWTH, MAX_INTERVAL, MIN_INTERVAL, learn_keys, prompt, wait_for_nodes
from .records import (
    CONFIG_KEY,
    LOGITS_KEY,
    MessageReply,
    arrays_bytes,
    has_test_upload,
    logits_record,
)
from .server import ASYNC_AVERAGE
from .settings import DEFAULTS, RunConfig
from .strategy import FedGKT, load_initial_arrays

__all__ = ["AsyncFedGKT"]

NODE_POLL_SECONDS = 1.0
"""How often the connected nodes are listed (to instruct newcomers)."""
MAX_RETRY_SECONDS = 60.0
"""The longest pause before a failing or rejected node is asked again."""


@dataclass
class _Sent:
    node_id: int
    instruction: Instruction
    at: float


class AsyncFedGKT(FedGKT):
    """FedGKT without rounds (the run config's ``mode = "async"``).

    Takes the arguments of :class:`~flwr_fedgkt.strategy.FedGKT`, and:

    Parameters
    ----------
    eval_every : int (default: 1)
        ``eval-every``: server epochs between records.
    checkpoint_every : int (default: 1)
        ``checkpoint-every``: server epochs between checkpoints (with ``checkpoint_dir``).
    max_logit_age : int | None (default: 4)
        ``max-logit-age``: flag replies computed against older server logits;
        None: never (the run config's -1).

    Notes
    -----
    ``max_staleness`` and ``freeze_after`` count server epochs here; every
    connected node takes part (``fraction_*`` are not used); ``start``'s
    ``num_rounds`` x ``server_epochs`` is the run's length in server epochs,
    counting those done before a resume, and ``timeout`` is each instruction's.
    A trainer without a moving average of its own (``ServerTrainer(average=None)``,
    the run config's ``server-average = -1``) gets :data:`~flwr_fedgkt.server.ASYNC_AVERAGE`:
    the server logits, the records and the final model come from the average.
    """

    def __init__(
        self,
        *args: Any,
        eval_every: int = DEFAULTS.eval_every,
        checkpoint_every: int = DEFAULTS.checkpoint_every,
        max_logit_age: int | None = DEFAULTS.max_logit_age,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.trainer.average is None:  # the schedule's default (server-average = -1)
            self.trainer.average = ASYNC_AVERAGE
        if eval_every < 1 or checkpoint_every < 1:
            raise ValueError("eval_every and checkpoint_every must be at least 1")
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.max_logit_age = max_logit_age
        self.server: ContinuousServer | None = None

    @classmethod
    def face_settings(cls, config: RunConfig) -> dict[str, Any]:
        return {
            **super().face_settings(config),
            "eval_every": config.eval_every,
            "checkpoint_every": config.checkpoint_every,
            "max_logit_age": None if config.max_logit_age < 0 else config.max_logit_age,
        }

    def summary(self) -> None:
        """Log FedGKT's settings, and the asynchronous schedule's."""
        super().summary()
        log(
            INFO,
            "\t└──> Asynchronous: record every %d server epoch(s), checkpoint every %d, "
            "max logit age %s, time budget %s, server average %g",
            self.eval_every,
            self.checkpoint_every,
            "none" if self.max_logit_age is None else self.max_logit_age,
            f"{self.budget.seconds:g} s" if self.budget.seconds else "none",
            self.trainer.average or 0.0,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Train until ``num_rounds`` x ``server_epochs`` server epochs are done
        (or ``time_budget`` is spent), keeping every connected node busy; the
        ``Result`` holds the final model and each record's metrics."""
        if evaluate_fn is not None:
            raise ValueError(
                "evaluate_fn needs a model per round: not with asynchronous training (use FedGKT)"
            )
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.summary()
        total_epochs = num_rounds * self.engine.server_epochs
        load_initial_arrays(self.trainer, initial_arrays, self.extractor)
        self.trainer.decay_over(total_epochs)
        grid = prompt(grid)
        self._grid = grid
        self.engine.connected = self._connected
        node_ids = wait_for_nodes(grid, max(self.min_available_nodes, 1))
        first = len(self.engine.history)
        server = ContinuousServer(  # the run's clock starts here, as a first round's does
            self.engine,
            total_epochs,
            self.budget.seconds,
            self.eval_every,
            self.checkpoint_every,
            self.max_logit_age,
        )
        self.server = server
        learn_keys(grid, self.engine, node_ids, self.query_timeout)
        config = dict(train_config or ConfigRecord())
        server.start()
        try:
            _Loop(self, grid, server, config, timeout).run()
        finally:
            server.stop()  # re-raises what the training raised
        result = Result()
        complete_result(result, self, first)
        return result

    def instruct(
        self, server: ContinuousServer, node_id: int, ins: Instruction, config: dict[str, Any]
    ) -> Message:
        """The training Message of ``ins`` for ``node_id``: the run's config, the
        settings every instruction carries, and the node's server logits."""
        held, _ = self.engine.instructions(node_id, training=True)
        round_config = {
            **config,
            **self.engine.round_config(ins.task, held, frozen=self.engine.frozen(server.version)),
            "test-features": ins.with_test,
            "held-test-features": self.engine.instructions(node_id, False)[0],
        }
        content = RecordDict({CONFIG_KEY: ConfigRecord(round_config)})
        if ins.logits is not None:
            content[LOGITS_KEY] = logits_record(*ins.logits)
        with server.lock:
            server.log.bytes_down += arrays_bytes(content)
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)


class _Loop:
    """The message loop of one asynchronous run."""

    def __init__(
        self,
        strategy: AsyncFedGKT,
        grid: Grid,
        server: ContinuousServer,
        config: dict[str, Any],
        timeout: float,
    ) -> None:
        self.strategy = strategy
        self.engine = strategy.engine
        self.grid = grid
        self.server = server
        self.config = config
        self.timeout = timeout
        self.out: dict[str, _Sent] = {}  # message id: what it asked
        self.busy: dict[int, str] = {}  # node id: its message out
        self.retry_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}  # node id: failures in a row

    def run(self) -> None:
        next_poll = 0.0
        interval = MIN_INTERVAL
        while not self.server.done:
            now = time.monotonic()
            if now >= next_poll:
                self.poll_nodes(now)
                next_poll = now + NODE_POLL_SECONDS
            arrived = list(self.grid.pull_messages(list(self.out))) if self.out else []
            ready = [self.receive(msg) for msg in arrived]
            self.send([node_id for node_id in ready if node_id is not None])
            self.expire(time.monotonic())
            interval = MIN_INTERVAL if arrived else min(interval * GROWTH, MAX_INTERVAL)
            self.server.wait(interval)

    def poll_nodes(self, now: float) -> None:
        """Forget the nodes that left; instruct the connected idle ones."""
        connected = set(self.grid.get_node_ids())
        for node_id in [n for n in self.busy if n not in connected]:
            self.out.pop(self.busy.pop(node_id), None)
            self.fail(node_id, "the node left the federation", now)
        idle = [
            n for n in sorted(connected) if n not in self.busy and self.retry_at.get(n, 0.0) <= now
        ]
        self.send(idle)

    def receive(self, msg: Message) -> int | None:
        """Validate one reply; its node, to be asked again at once, or None when
        the node is to wait before it is asked again."""
        sent = self.out.pop(msg.metadata.reply_to_message_id, None)
        if sent is None:
            return None
        node_id = sent.node_id
        self.busy.pop(node_id, None)
        if msg.has_error():
            self.fail(node_id, msg.error.reason, time.monotonic())
            return None
        test = MessageReply(msg, test=True) if has_test_upload(msg) else None
        accepted = self.server.accept(MessageReply(msg), test, sent.instruction)
        if accepted is None:
            self.wait_before_asking(node_id, time.monotonic())
            return None
        self.failures.pop(node_id, None)
        return node_id

    def send(self, ready: Iterable[int]) -> None:
        """Push each ready node its next instruction, all in one call."""
        messages, sent = [], []
        for node_id in ready:
            ins = self.server.instruction(self.engine.registry.key_of(node_id))
            messages.append(self.strategy.instruct(self.server, node_id, ins, self.config))
            sent.append(_Sent(node_id, ins, time.monotonic()))
        if not messages:
            return
        pushed = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        for message, what in zip(messages, sent, strict=True):
            message_id = message.metadata.message_id
            if message_id in pushed:
                self.out[message_id] = what
                self.busy[what.node_id] = message_id
            else:  # the grid refused it (Flower logs why)
                self.wait_before_asking(what.node_id, time.monotonic())

    def expire(self, now: float) -> None:
        """Give up on instructions without a reply after ``timeout`` seconds."""
        for message_id, sent in list(self.out.items()):
            if now - sent.at > self.timeout:
                del self.out[message_id]
                self.busy.pop(sent.node_id, None)
                self.fail(sent.node_id, "no reply within the timeout", now)

    def fail(self, node_id: int, reason: str | None, now: float) -> None:
        self.server.failure(node_id, reason)
        self.wait_before_asking(node_id, now)

    def wait_before_asking(self, node_id: int, now: float) -> None:
        count = self.failures[node_id] = self.failures.get(node_id, 0) + 1
        self.retry_at[node_id] = now + min(MAX_RETRY_SECONDS, 2.0 ** (count - 1))
