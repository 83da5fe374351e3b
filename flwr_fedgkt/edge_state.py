"""Where a node keeps its edge state between rounds.

An :class:`EdgeStateStore` is anything that saves a blob of bytes per round and
loads the newest one before a given round (the newest :data:`KEEP_ROUNDS` are
kept), so that a node that trained a round the server never finished continues
from the state the server's checkpoint matches. :class:`DirectoryStateStore`
keeps them in ``client-state-dir`` (``edge-<node key>-round-<r>.pt``, written
atomically), so that a restarted node continues from them;
:class:`MemoryStateStore` keeps them in memory (a node simulated in one process);
the Flower layer keeps them in ``context.state``
(:class:`flwr_fedgkt.client.ContextStateStore`). :func:`edge_state_store` puts a
node's own store and the directory together: restore from the node's own store
when it holds a state, else from the directory; save to both.

This module imports no Flower code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .files import write_atomic
from .store import file_label

__all__ = [
    "EdgeStateStore",
    "KEEP_ROUNDS",
    "StateAheadError",
    "pick_round",
    "stale_rounds",
    "DirectoryStateStore",
    "MemoryStateStore",
    "LayeredStateStore",
    "edge_state_file",
    "edge_state_store",
]


KEEP_ROUNDS = 3
"""How many rounds' edge states a store keeps (the newest ones). Two would do for
sequential rounds (a node may have trained round r + 1 when the server's newest
checkpoint is round r's); pipelined rounds need three, since a node trains round
t + 1 while the server's newest checkpoint is still round t - 1's."""


class EdgeStateStore(Protocol):
    """Where a node keeps its serialised edge state between rounds, one state per
    round (the newest :data:`KEEP_ROUNDS`), so that a node that trained a round
    the server never finished (the server crashed and resumed from an older
    checkpoint) continues from the state the server's checkpoint matches."""

    def load(self, before_round: int | None = None) -> bytes | None:
        """The newest state of a round before ``before_round`` (of any round when
        None); None when there is no state at all. StateAheadError when every state
        is of ``before_round`` or later."""

    def save(self, blob: bytes, server_round: int = 0) -> None:
        """Keep ``blob`` as the state after ``server_round``."""


class StateAheadError(RuntimeError):
    """A node holds edge states only of rounds the server has not reached."""


def pick_round(rounds: Iterable[int], before_round: int | None) -> int | None:
    """The newest of ``rounds`` before ``before_round`` (the newest when None);
    None when ``rounds`` is empty. StateAheadError when all are at or after it."""
    rounds = sorted(rounds)
    if not rounds:
        return None
    if before_round is None or before_round <= 0:
        return rounds[-1]
    earlier = [r for r in rounds if r < before_round]
    if not earlier:
        raise StateAheadError(
            f"the node keeps edge states of rounds {rounds} only, none before round "
            f"{before_round} that the server asks for (did the server resume from an older "
            f"checkpoint than the newest {KEEP_ROUNDS} rounds this node trained?)"
        )
    return earlier[-1]


def stale_rounds(rounds: Iterable[int]) -> list[int]:
    """The rounds of ``rounds`` a store no longer keeps (all but the newest
    :data:`KEEP_ROUNDS`)."""
    return sorted(rounds)[:-KEEP_ROUNDS]


def edge_state_file(directory: str | Path, node_key: str, server_round: int) -> Path:
    """The file a node's edge state after ``server_round`` is kept in."""
    return Path(directory) / f"edge-{file_label(node_key)}-round-{server_round}.pt"


class DirectoryStateStore:
    """One node's edge states in a directory (``client-state-dir``): a file
    ``edge-<node key>-round-<r>.pt`` per round, each written atomically, the
    newest :data:`KEEP_ROUNDS` kept."""

    def __init__(self, directory: str | Path, node_key: str) -> None:
        self.directory = Path(directory)
        self.node_key = node_key
        self._pattern = re.compile(re.escape(f"edge-{file_label(node_key)}-round-") + r"(\d+)\.pt")

    def __repr__(self) -> str:
        return f"DirectoryStateStore({str(self.directory)!r}, {self.node_key!r})"

    def rounds(self) -> list[int]:
        """The rounds whose states are kept."""
        if not self.directory.is_dir():
            return []
        found = (self._pattern.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, before_round: int | None = None) -> bytes | None:
        chosen = pick_round(self.rounds(), before_round)
        if chosen is None:
            return None
        return edge_state_file(self.directory, self.node_key, chosen).read_bytes()

    def save(self, blob: bytes, server_round: int = 0) -> None:
        write_atomic(
            edge_state_file(self.directory, self.node_key, server_round),
            lambda handle: handle.write(blob),
        )
        for old in stale_rounds(self.rounds()):
            edge_state_file(self.directory, self.node_key, old).unlink(missing_ok=True)


class MemoryStateStore:
    """The edge states in this object (a node simulated in one process)."""

    def __init__(self) -> None:
        self.blobs: dict[int, bytes] = {}

    def load(self, before_round: int | None = None) -> bytes | None:
        chosen = pick_round(self.blobs, before_round)
        return None if chosen is None else self.blobs[chosen]

    def save(self, blob: bytes, server_round: int = 0) -> None:
        self.blobs[server_round] = blob
        for old in stale_rounds(self.blobs):
            del self.blobs[old]


class LayeredStateStore:
    """Several stores as one: ``load`` returns the first state found, in order (a
    store that holds only newer states gives way to the next one);
    ``save`` writes to every store, in order."""

    def __init__(self, *stores: EdgeStateStore) -> None:
        self.stores = stores

    def __repr__(self) -> str:
        return f"LayeredStateStore{self.stores!r}"

    def load(self, before_round: int | None = None) -> bytes | None:
        ahead: StateAheadError | None = None
        for store in self.stores:
            try:
                blob = store.load(before_round)
            except StateAheadError as err:
                ahead = err
                continue
            if blob is not None:
                return blob
        if ahead is not None:
            raise ahead
        return None

    def save(self, blob: bytes, server_round: int = 0) -> None:
        for store in self.stores:
            store.save(blob, server_round)


def edge_state_store(
    primary: EdgeStateStore, state_dir: str | None, node_key: str
) -> EdgeStateStore:
    """The store a node's round uses: ``primary`` (the node's own, e.g. Flower's
    ``context.state``) and, with a ``state_dir`` (``client-state-dir``), this
    node's file there. A state in ``primary`` wins; the file is read only when
    ``primary`` has none (a restarted node); both are saved to."""
    if not state_dir:
        return primary
    return LayeredStateStore(primary, DirectoryStateStore(state_dir, node_key))
