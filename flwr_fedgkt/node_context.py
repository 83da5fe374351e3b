"""What a node keeps in its Flower ``Context``: its edge states by round
(:class:`ContextStateStore`), its key and its signing key (:func:`node_identity`),
and its answer to the server's key query (:func:`key_reply`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from .identity import NodeIdentity
from .node import pick_round, stale_rounds
from .records import META_KEY, NODE_KEY

__all__ = [
    "ContextStateStore",
    "IDENTITY_KEY",
    "STATE_KEY",
    "default_node_key",
    "key_reply",
    "node_identity",
]

STATE_KEY = "edge_state"
"""The key of the edge state's ArrayRecord in ``context.state``."""
IDENTITY_KEY = "fedgkt-identity"
"""The key of the node identity's ConfigRecord in ``context.state``."""

ROUND_PREFIX = "round-"


def _round_of(name: str) -> int:
    """The round of a state's array name ``round-<r>``."""
    return int(name[len(ROUND_PREFIX) :])


class ContextStateStore:
    """The edge states in a node's ``context.state``: in the ArrayRecord under
    ``key``, one ``uint8`` array ``round-<r>`` per round (the newest
    :data:`~flwr_fedgkt.node.KEEP_ROUNDS`)."""

    def __init__(self, context: Context, key: str = STATE_KEY) -> None:
        self.context = context
        self.key = key

    def _record(self) -> ArrayRecord:
        return self.context.state.array_records.get(self.key, ArrayRecord())

    def rounds(self) -> list[int]:
        """The rounds whose states are kept."""
        return sorted(_round_of(name) for name in self._record())

    def load(self, before_round: int | None = None) -> bytes | None:
        chosen = pick_round(self.rounds(), before_round)
        if chosen is None:
            return None
        return self._record()[f"{ROUND_PREFIX}{chosen}"].numpy().tobytes()

    def save(self, blob: bytes, server_round: int = 0) -> None:
        record = self._record()
        arrays = {name: record[name] for name in record}
        arrays[f"{ROUND_PREFIX}{server_round}"] = Array(np.frombuffer(blob, np.uint8).copy())
        for old in stale_rounds(_round_of(name) for name in arrays):
            del arrays[f"{ROUND_PREFIX}{old}"]
        self.context.state[self.key] = ArrayRecord(array_dict=arrays)


def default_node_key(node_config: Mapping[str, Any]) -> str:
    """A node's key when none is given: its ``partition-id``, as text."""
    if "partition-id" not in node_config:
        raise ValueError(
            "the node config has no 'partition-id' to key this node's state by; pass "
            "node_key=... to FedGKTClient, or start the SuperNode with "
            '--node-config "partition-id=<i>"'
        )
    return str(node_config["partition-id"])


def node_identity(context: Context, node_key: str, state_dir: str | None = None) -> NodeIdentity:
    """The node's signing key (:class:`~flwr_fedgkt.identity.NodeIdentity`): kept
    in ``context.state`` and, with ``state_dir`` (``client-state-dir``), in a file
    there, so that a restarted node proves the same key; created on first use."""
    record = context.state.config_records.get(IDENTITY_KEY)
    held = record.get("secret") if record is not None else None
    identity = NodeIdentity.kept(held if isinstance(held, bytes) else None, state_dir, node_key)
    if held != identity.secret:
        context.state[IDENTITY_KEY] = ConfigRecord({"secret": identity.secret})
    return identity


def key_reply(
    msg: Message, node_key: str, context: Context | None = None, state_dir: str | None = None
) -> Message:
    """The answer to the server's key query: ``node_key`` in the ``meta`` record.

    With the node's ``context`` the answer also proves the key with the node's
    signing key (:func:`node_identity`; ``state_dir`` as there), so that no other
    node can take it later; without, the key is only named."""
    meta: dict[str, Any] = {NODE_KEY: node_key}
    if context is not None:
        identity = node_identity(context, node_key, state_dir)
        meta.update(identity.prove("query", node_key, msg.metadata.dst_node_id, 0))
    return Message(content=RecordDict({META_KEY: ConfigRecord(meta)}), reply_to=msg)
