"""What one node can and cannot do, beyond malformed replies: compression bombs,
near-copies of another node's features, and features or logits far outside the
range the honest nodes send (through the real strategy, beside three honest
nodes; the helpers are test_hostile_replies').
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import zstandard
from conftest import FakeGrid
from flwr.app import ConfigRecord
from test_hostile_replies import HONEST, HOSTILE, SHAPE, _arrays, _honest, _reply, _strategy

from flwr_fedgkt.validation import reply as reply_module

BOMB_SAMPLES = 65_536


def _bomb(with_labels: bool) -> dict:
    """A zstd frame of zeros for 65,536 samples of int8 features (16 MiB inflated,
    a few KB sent), with ids, and with labels and logits or without."""
    ids = np.arange(10_000, 10_000 + BOMB_SAMPLES, dtype=np.int64)
    frame = zstandard.ZstdCompressor(level=19).compress(bytes(BOMB_SAMPLES * int(np.prod(SHAPE))))
    arrays = {
        "features": np.frombuffer(frame, dtype=np.uint8).copy(),
        "feature_scale": np.ones(SHAPE[0], dtype=np.float32),
        "feature_zero": np.zeros(SHAPE[0], dtype=np.float32),
        "ids": ids,
    }
    if with_labels:
        arrays["labels"] = (ids % 10).astype(np.int64)
        arrays["logits"] = np.zeros((BOMB_SAMPLES, 10), dtype=np.float32)
    return arrays


@pytest.mark.parametrize(
    ("with_labels", "partitions", "reason"),
    [
        (False, True, "missing arrays: labels, logits"),
        (True, True, "65536 samples, more than node key '9' can hold \\(8: its partition"),
        (True, False, "more than 32 times; not inflated"),
    ],
    ids=["no-labels", "beyond-its-partition", "first-contact-bomb"],
)
def test_a_compression_bomb_is_refused_before_anything_is_inflated(
    task_identity, monkeypatch, with_labels, partitions, reason
) -> None:
    # Prepare: count what the server inflates
    inflated: list[int] = []
    real_inflate = reply_module.inflate

    def counting(blob, codec, expected):
        inflated.append(expected)
        return real_inflate(blob, codec, expected)

    monkeypatch.setattr(reply_module, "inflate", counting)
    strategy = _strategy(**({} if partitions else {"sample_ids": None}))
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([*HONEST, HOSTILE]))
    honest = _honest(1, "int8")
    bomb = _reply(HOSTILE, 1, _bomb(with_labels), "int8")
    bomb.content["meta"]["compression"] = "zstd"
    # Execute
    strategy.aggregate_train(1, [*honest, bomb])
    # Assert: the bomb is refused with its reason, nothing of it was inflated, the
    # honest nodes trained
    rejected = strategy.engine.current.rejected_replies
    assert [r["node_id"] for r in rejected] == [HOSTILE]
    assert re.search(reason, rejected[0]["reason"]), rejected
    assert all(n < BOMB_SAMPLES * int(np.prod(SHAPE)) for n in inflated)
    assert strategy.store.nodes() == ["1", "2", "3"]


def test_honest_compressed_replies_are_inflated(task_identity, monkeypatch) -> None:
    # Prepare: the honest replies, zstd-compressed as a FedGKTClient sends them
    strategy = _strategy(sample_ids=None)
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid(HONEST))
    replies = []
    for node, ids in HONEST.items():
        arrays = _arrays(ids, "int8", node)
        frame = zstandard.ZstdCompressor().compress(np.ascontiguousarray(arrays["features"]))
        arrays["features"] = np.frombuffer(frame, dtype=np.uint8).copy()
        message = _reply(node, 1, arrays, "int8")
        message.content["meta"]["compression"] = "zstd"
        replies.append(message)
    # Execute
    strategy.aggregate_train(1, replies)
    # Assert
    assert strategy.engine.current.rejected_replies == []
    assert strategy.store.nodes() == ["1", "2", "3"]
