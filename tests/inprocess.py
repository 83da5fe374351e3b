"""An in-process stand-in for Flower's Grid: messages go straight to the ClientApp
functions, one Context per node, no transport. For tests that need many exact,
repeatable rounds (resume, faults) without the cost of a federation."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict

from flwr_fedgkt import client_app

Handler = Callable[[Message, Context], Message]


def node_context(node_id: int, partition_id: int, num_partitions: int, run_config: dict) -> Context:
    """A ClientApp's Context on node ``node_id``, holding partition ``partition_id``
    of ``num_partitions`` (a copy of ``run_config``)."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def server_context(run_config: dict | None = None) -> Context:
    """A ServerApp's Context (node 0, no node config; a copy of ``run_config``)."""
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {})
    )


def model_hash(module: torch.nn.Module) -> str:
    """SHA-256 of the bytes of ``module``'s state dict, tensor by tensor in order."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


class InProcessGrid:
    """Delivers each message to its node's ClientApp function.

    ``handlers`` may replace a node's train/evaluate function (to make it raise or
    reply with garbage); a node listed in ``silent`` never replies, as if it had
    missed the round's timeout.
    """

    def __init__(
        self,
        contexts: dict[int, Context],
        handlers: dict[tuple[int, str], Handler] | None = None,
        silent: set[int] | None = None,
    ) -> None:
        self.contexts = contexts
        self.handlers = handlers or {}
        self.silent = silent or set()
        # the array names of each reply's "features" record, by (node, kind, round);
        # a training reply's test upload ("test-features") counts as the evaluation's
        self.uploads: dict[tuple[int, str, int], list[str]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            kind = msg.metadata.message_type
            default = {
                MessageType.TRAIN: client_app.train,
                MessageType.EVALUATE: client_app.evaluate,
                MessageType.QUERY: client_app.query,
            }[kind]
            handler = self.handlers.get((node, kind), default)
            try:
                reply = handler(msg, self.contexts[node])
                replies.append(reply)
                server_round = int(
                    msg.content.config_records.get("config", {}).get("server-round", 0)
                )
                for record, upload in (("features", kind), ("test-features", MessageType.EVALUATE)):
                    if not reply.has_error() and record in reply.content.array_records:
                        names = sorted(reply.content.array_records[record].keys())
                        self.uploads[(node, upload, server_round)] = names
            except Exception as err:  # what Flower does with a ClientApp exception
                replies.append(
                    Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
                )
        return replies


class HandlerGrid:
    """Messages go straight to a ClientApp's handlers (``client``: train, evaluate,
    query by message type), one Context per node (partition ``i`` on node
    ``10 + i``); a handler that raises gives an error reply, as Flower reports a
    ClientApp exception."""

    def __init__(self, client: dict, num_nodes: int) -> None:
        self.client = client
        self.contexts = {10 + i: node_context(10 + i, i, num_nodes, {}) for i in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            handler = self.client[msg.metadata.message_type]  # train, evaluate, query
            try:
                replies.append(handler(msg, self.contexts[node]))
            except Exception as err:  # as Flower reports a ClientApp exception
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=msg))
        return replies
