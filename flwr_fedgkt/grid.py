"""A Grid that notices replies as they arrive; waiting for nodes and asking
them for their keys.

Flower's ``Grid.send_and_receive`` pushes the messages, then pulls replies every
3 seconds in a deployment's ServerApp (its HTTP grid; every 0.1 s in the
simulation's in-memory grid): there a message phase waits on average 1.5 s after
its last reply. :class:`PromptGrid` wraps the run's grid and does the same with
``push_messages`` / ``pull_messages``, pulling every 20 ms at first and less
often the longer nothing arrives (at most every ``max_interval`` seconds); each
reply starts the short interval again. Everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from .records import CONFIG_KEY, META_KEY, NODE_KEY, QUERY_KEY
from .rounds import RoundEngine
from .validation import proof_of

__all__ = ["PromptGrid", "learn_keys", "prompt", "wait_for_nodes"]

MIN_INTERVAL = 0.02
"""Seconds between the first pulls, and again after each reply."""
MAX_INTERVAL = 0.5
"""The longest wait between two pulls."""
GROWTH = 1.5
"""Each empty pull makes the next wait this much longer."""


class PromptGrid(Grid):
    """``grid`` with a ``send_and_receive`` that pulls often while replies are due.

    Parameters
    ----------
    grid : Grid
        The run's grid; every call but ``send_and_receive`` goes to it.
    max_interval : float (default: 0.5)
        The longest wait between two pulls.
    """

    def __init__(self, grid: Grid, max_interval: float = MAX_INTERVAL) -> None:
        self.grid = grid
        self.max_interval = max_interval

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all arrived or ``timeout``
        seconds passed (None: no limit), as Flower's ``send_and_receive`` does."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = MIN_INTERVAL
        while pending:
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(msg.metadata.reply_to_message_id for msg in arrived)
            if not pending:
                break
            now = time.monotonic()
            if end is not None and now >= end:
                break
            interval = MIN_INTERVAL if arrived else min(interval * GROWTH, self.max_interval)
            time.sleep(interval if end is None else min(interval, max(0.0, end - now)))
        return replies

    def __getattr__(self, name: str) -> Any:  # the wrapped grid's own extras
        return getattr(self.__dict__["grid"], name)


def prompt(grid: Grid) -> Grid:
    """``grid`` as a :class:`PromptGrid`; unchanged when it is one already, or is
    not a Flower ``Grid`` (a stand-in with a ``send_and_receive`` of its own)."""
    if isinstance(grid, PromptGrid) or not isinstance(grid, Grid):
        return grid
    return PromptGrid(grid)


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    """The ids of the connected nodes, once at least ``minimum`` are connected
    (a log line every second while waiting)."""
    while len(node_ids := list(grid.get_node_ids())) < minimum:
        log(
            INFO,
            "Waiting for nodes to connect: %d connected (minimum required: %d).",
            len(node_ids),
            minimum,
        )
        time.sleep(1)
    return node_ids


def learn_keys(grid: Grid, engine: RoundEngine, node_ids: Collection[int], timeout: float) -> None:
    """Ask the nodes among ``node_ids`` whose key the server does not know for it
    (a ``query`` Message; :meth:`FedGKTClient.query <flwr_fedgkt.client.FedGKTClient.query>`
    answers it), so that nodes are sampled by key and a resumed run's first
    round sends every node its server logits. A node that cannot answer (a
    ClientApp without a query handler) is not asked again; it gets its key
    bound by its first training reply."""
    unknown = engine.members.keys_to_ask(node_ids)
    if not unknown:
        return
    messages = [
        Message(
            content=RecordDict({CONFIG_KEY: ConfigRecord({QUERY_KEY: NODE_KEY})}),
            message_type=MessageType.QUERY,
            dst_node_id=node_id,
        )
        for node_id in unknown
    ]
    answered = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error() or META_KEY not in reply.content.config_records:
            continue
        answered.add(node_id)
        meta = reply.content.config_records[META_KEY]
        key = meta.get(NODE_KEY)
        proof = proof_of(meta, "query", key, node_id, 0) if isinstance(key, str) else None
        engine.members.learn_key(node_id, key, proof)
    engine.members.no_key(set(unknown) - answered)
    log(INFO, "node keys: %d asked, %d answered", len(unknown), len(answered))
