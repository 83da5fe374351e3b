"""PromptGrid: replies pulled as they arrive (not every 3 s, as Flower's grid over
the network does), with push_messages / pull_messages of the wrapped grid; every
other call goes to the wrapped grid."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict
from flwr.serverapp import Grid
from inprocess import InProcessGrid

import flwr_fedgkt.grid as grid_module
from flwr_fedgkt.grid import MAX_INTERVAL, MIN_INTERVAL, PromptGrid, prompt

MAX_SLEEPS = 1000
"""The fake clock fails the test after this many waits (a grid that never stops)."""

NEVER = None
"""A reply that never comes."""

SAFETY_SECONDS = 3.0
"""The fake fails a pull this long (on the fake clock) after the push (a grid
that kept pulling)."""


class FakeClock:
    """The grid's ``time``: ``sleep`` advances ``monotonic`` at once and is noted,
    so that no test depends on how fast this machine is."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) > MAX_SLEEPS:  # e.g. zero-second waits past a timeout
            raise AssertionError(f"still waiting after {MAX_SLEEPS} waits")


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> FakeClock:
    """Every test here runs PromptGrid on a :class:`FakeClock`."""
    fake = FakeClock()
    monkeypatch.setattr(grid_module, "time", fake)
    return fake


def _message(number: int, node_id: int) -> Message:
    """An instruction to ``node_id`` with its own message id ``msg-<number>``."""
    metadata = Metadata(
        run_id=1,
        message_id=f"msg-{number}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=RecordDict(), metadata=metadata)


class FakeGrid(Grid):
    """A Flower Grid whose nodes reply after a number of pulls (``("pulls", n)``) or
    of seconds after the push (``("seconds", s)``), or never (None); by node id.
    Each reply is pulled once. Its own ``send_and_receive`` must not be used."""

    def __init__(self, ready: dict[int, tuple[str, float] | None], clock: FakeClock) -> None:
        self.ready = ready
        self.clock = clock
        self.pushed: list[Message] = []
        self.pushes = 0
        self.pulls: list[list[str]] = []  # the ids asked for, pull by pull
        self.delivered: set[str] = set()
        self.pushed_at = 0.0
        self.own_send_and_receive = 0
        self.runs: list[object] = []
        self.extra = "the wrapped grid's own attribute"

    def set_run(self, run) -> None:
        self.runs.append(run)

    @property
    def run(self):
        return "the run"

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return ("created", message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [7, 8]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushes += 1
        self.pushed.extend(messages)
        self.pushed_at = self.clock.monotonic()
        return [msg.metadata.message_id for msg in messages]

    def _is_ready(self, msg: Message) -> bool:
        when = self.ready[msg.metadata.dst_node_id]
        if when is NEVER:
            return False
        unit, amount = when
        if unit == "pulls":
            return len(self.pulls) >= amount
        return self.clock.monotonic() - self.pushed_at >= amount

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        asked = sorted(message_ids)
        self.pulls.append(asked)
        if self.clock.monotonic() - self.pushed_at > SAFETY_SECONDS:
            raise AssertionError(f"still pulling {SAFETY_SECONDS} s after the push")
        replies = []
        for msg in self.pushed:
            msg_id = msg.metadata.message_id
            if msg_id in asked and msg_id not in self.delivered and self._is_ready(msg):
                self.delivered.add(msg_id)
                replies.append(Message(content=RecordDict(), reply_to=msg))
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        self.own_send_and_receive += 1
        raise AssertionError("the wrapped grid's send_and_receive was called")


def _replied_to(replies: Iterable[Message]) -> list[str]:
    return sorted(reply.metadata.reply_to_message_id for reply in replies)


def test_every_reply_is_returned_and_only_pending_ids_are_pulled(clock) -> None:
    # Prepare: three nodes whose replies are ready at the 1st, 3rd and 5th pull
    fake = FakeGrid({1: ("pulls", 1), 2: ("pulls", 3), 3: ("pulls", 5)}, clock)
    messages = [_message(1, 1), _message(2, 2), _message(3, 3)]
    # Execute
    replies = list(PromptGrid(fake).send_and_receive(messages))
    # Assert: all three, each once, from one push and five pulls
    assert _replied_to(replies) == ["msg-1", "msg-2", "msg-3"]
    assert len(replies) == 3
    assert fake.pushes == 1 and fake.pushed == messages
    assert fake.pulls == [
        ["msg-1", "msg-2", "msg-3"],
        ["msg-2", "msg-3"],
        ["msg-2", "msg-3"],
        ["msg-3"],
        ["msg-3"],
    ]
    assert fake.own_send_and_receive == 0


def test_a_reply_is_taken_soon_after_it_arrives(clock) -> None:
    # Prepare: one reply at once, one 0.3 s after the push
    fake = FakeGrid({1: ("pulls", 1), 2: ("seconds", 0.3)}, clock)
    grid = PromptGrid(fake)
    # Execute
    began = clock.monotonic()
    replies = grid.send_and_receive([_message(1, 1), _message(2, 2)])
    elapsed = clock.monotonic() - began
    # Assert: both, the second within one (short) pull interval of its arrival,
    # well before a 3-s poll would have found it; the waits start short after a
    # reply and grow, never past MAX_INTERVAL
    assert _replied_to(replies) == ["msg-1", "msg-2"]
    assert 0.3 <= elapsed < 0.3 + MAX_INTERVAL, elapsed
    assert clock.sleeps[0] == pytest.approx(MIN_INTERVAL)
    assert all(b >= a for a, b in zip(clock.sleeps, clock.sleeps[1:], strict=False))
    assert max(clock.sleeps) <= MAX_INTERVAL
    assert fake.own_send_and_receive == 0


def test_a_timeout_returns_the_replies_there_are(clock) -> None:
    # Prepare: one node replies at once, the other never
    fake = FakeGrid({1: ("pulls", 1), 2: NEVER}, clock)
    grid = PromptGrid(fake)
    # Execute
    began = clock.monotonic()
    replies = grid.send_and_receive([_message(1, 1), _message(2, 2)], timeout=0.2)
    elapsed = clock.monotonic() - began
    # Assert: the one reply, after the timeout exactly (the last wait cut to it),
    # nothing raised
    assert _replied_to(replies) == ["msg-1"]
    assert elapsed == pytest.approx(0.2)
    assert fake.pulls[-1] == ["msg-2"]
    assert fake.own_send_and_receive == 0


def test_no_messages_means_no_pull(clock) -> None:
    # Prepare
    fake = FakeGrid({}, clock)
    # Execute
    replies = PromptGrid(fake).send_and_receive([])
    # Assert
    assert list(replies) == []
    assert fake.pulls == [] and fake.own_send_and_receive == 0


def test_everything_but_send_and_receive_is_the_wrapped_grids(clock) -> None:
    # Prepare
    fake = FakeGrid({5: ("pulls", 1)}, clock)
    grid = PromptGrid(fake)
    msg = _message(9, 5)
    # Execute / Assert
    assert list(grid.get_node_ids()) == [7, 8]
    assert [node.node_id for node in grid.get_nodes()] == [7, 8]
    assert list(grid.push_messages([msg])) == ["msg-9"]
    assert fake.pushed == [msg]
    assert _replied_to(grid.pull_messages(["msg-9"])) == ["msg-9"]
    assert fake.pulls == [["msg-9"]]
    assert grid.run == "the run"
    grid.set_run("another run")
    assert fake.runs == ["another run"]
    created = grid.create_message(RecordDict(), MessageType.EVALUATE, 5, "2", ttl=10.0)
    assert created == ("created", MessageType.EVALUATE, 5, "2", 10.0)
    assert grid.extra == "the wrapped grid's own attribute"
    assert fake.own_send_and_receive == 0


def test_prompt_wraps_a_flower_grid_once(clock) -> None:
    # Prepare
    fake = FakeGrid({}, clock)
    # Execute
    wrapped = prompt(fake)
    # Assert
    assert isinstance(wrapped, PromptGrid) and wrapped.grid is fake
    assert prompt(wrapped) is wrapped


def test_prompt_leaves_a_stand_in_that_is_no_flower_grid() -> None:
    # Prepare: a stand-in with a send_and_receive of its own
    stand_in = InProcessGrid({})
    # Execute / Assert
    assert prompt(stand_in) is stand_in
