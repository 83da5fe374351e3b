"""Shared test helpers: Flower messages without a running federation."""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, Metadata, RecordDict


def make_message(
    content: RecordDict, src_node_id: int, dst_node_id: int, message_type: str
) -> Message:
    """A Message with explicit metadata, as the runtime would deliver it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"{src_node_id}-{dst_node_id}-{time.monotonic_ns()}",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


@pytest.fixture
def task_identity(monkeypatch):
    """Give this process the identity a ServerApp/ClientApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    return TaskIdentity
