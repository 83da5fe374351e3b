"""An in-process stand-in for Flower's Grid: messages go straight to the ClientApp
functions, one Context per node, no transport. For tests that need many exact,
repeatable rounds (resume, faults) without the cost of a federation."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from uuid import uuid4

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


class AsyncGrid:
    """Flower's ``push_messages`` / ``pull_messages`` in process: each node runs
    its messages in order in a thread of its own (the ClientApp functions, or
    ``handlers`` by (node, message type)), so nodes reply independently.

    ``events`` lists ``("sent" | "replied", node, server-round)`` in the order
    they happened; ``connected`` is the set of node ids the grid reports (a test
    may add or remove nodes mid-run: a removed node's replies are dropped).
    """

    def __init__(
        self,
        contexts: dict[int, Context],
        handlers: dict[tuple[int, str], Handler] | None = None,
    ) -> None:
        self.contexts = contexts
        self.handlers = handlers or {}
        self.connected = set(contexts)
        self.events: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        self._replies: dict[str, Message] = {}
        self._queues: dict[int, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        for node in contexts:
            self._queues[node] = queue.Queue()
            thread = threading.Thread(target=self._serve, args=(node,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def get_node_ids(self) -> list[int]:
        return sorted(self.connected)

    def _note(self, kind: str, msg: Message, node: int) -> None:
        config = msg.content.config_records.get("config", {})
        with self._lock:
            self.events.append((kind, node, int(config.get("server-round", 0))))

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            node = msg.metadata.dst_node_id
            if node not in self.connected:
                continue
            if msg.metadata.message_type == MessageType.TRAIN:
                self._note("sent", msg, node)
            self._queues[node].put(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        with self._lock:
            found = [self._replies.pop(i) for i in list(self._replies) if i in wanted]
        return found

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (60.0 if timeout is None else timeout)
        replies: list[Message] = []
        while pending and time.monotonic() < end:
            for reply in self.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            time.sleep(0.01)
        return replies

    def close(self) -> None:
        """Stop the nodes once their current message is done (a thread left inside
        torch at interpreter exit aborts the process)."""
        for node_queue in self._queues.values():
            node_queue.put(None)
        for thread in self._threads:
            thread.join(timeout=300)

    def _serve(self, node: int) -> None:
        while (msg := self._queues[node].get()) is not None:
            kind = msg.metadata.message_type
            default = {
                MessageType.TRAIN: client_app.train,
                MessageType.EVALUATE: client_app.evaluate,
                MessageType.QUERY: client_app.query,
            }[kind]
            handler = self.handlers.get((node, kind), default)
            try:
                reply = handler(msg, self.contexts[node])
            except Exception as err:  # what Flower does with a ClientApp exception
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if node not in self.connected:
                continue
            if kind == MessageType.TRAIN:
                self._note("replied", msg, node)
            with self._lock:
                self._replies[msg.metadata.message_id] = reply
