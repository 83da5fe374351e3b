"""What one node can and cannot do, beyond malformed replies: compression bombs,
near-copies of another node's features, and features or logits far outside the
range the honest nodes send (through the real strategy, beside three honest
nodes; the helpers are test_hostile_replies').
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import zstandard
from conftest import FakeGrid
from flwr.app import ConfigRecord
from test_hostile_replies import (
    HONEST,
    HOSTILE,
    HOSTILE_IDS,
    SHAPE,
    _arrays,
    _honest,
    _reply,
    _strategy,
)

from flwr_fedgkt.codec import FeaturePayload, encode_features
from flwr_fedgkt.node import edge_model_factory, load_node_partition
from flwr_fedgkt.registry import NEAR_COPY_SHARE
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.sketch import sample_sketches
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
        "feature_offset": np.zeros(SHAPE[0], dtype=np.float32),
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


def _round(strategy, server_round: int, replies_first: list, replies_last: list | None = None):
    """Round ``server_round``'s training phase with these replies, in this order."""
    strategy.configure_train(server_round, None, ConfigRecord(), FakeGrid([*HONEST, HOSTILE]))
    strategy.aggregate_train(server_round, [*replies_first, *(replies_last or [])])
    return strategy.engine.current


@pytest.mark.parametrize("first", [True, False], ids=["hostile-first", "hostile-last"])
def test_features_far_above_the_other_nodes_are_rejected_whoever_replies_first(
    task_identity, first
) -> None:
    # Prepare: int8 features decoding to about 9,000 (inside max-feature-abs), the
    # honest ones below 6
    strategy = _strategy()
    extreme = _arrays(HOSTILE_IDS, "int8", 99)
    extreme["feature_scale"] = np.full(SHAPE[0], 9000 / 255, dtype=np.float32)
    hostile = _reply(HOSTILE, 1, extreme, "int8")
    honest = _honest(1, "int8")
    # Execute
    log = _round(strategy, 1, [hostile, *honest] if first else [*honest, hostile])
    # Assert: only the hostile reply is rejected, naming the ratio; the honest
    # nodes' features are stored and trained on
    assert [r["node_id"] for r in log.rejected_replies] == [HOSTILE]
    assert re.search(
        r"features up to \d+.* the other nodes' median", log.rejected_replies[0]["reason"]
    )
    assert strategy.store.nodes() == ["1", "2", "3"]


def test_a_federation_with_larger_features_is_not_rejected(task_identity) -> None:
    # Prepare: every node's features 1,000 times the others' scale (a user model
    # whose features are large), at the default bounds: nothing to tune
    strategy = _strategy("float32")
    replies = []
    for node, ids in HONEST.items():
        arrays = _arrays(ids, "float32", node)
        arrays["features"] = arrays["features"] * 1000
        replies.append(_reply(node, 1, arrays, "float32"))
    # Execute
    log = _round(strategy, 1, replies)
    # Assert
    assert log.rejected_replies == []
    assert strategy.store.nodes() == ["1", "2", "3"]


def test_edge_logits_far_above_the_other_nodes_are_rejected(task_identity) -> None:
    # Prepare: logits of 5,000 (inside max-logit-abs); the honest ones below 5
    strategy = _strategy()
    loud = _arrays(HOSTILE_IDS, "int8", 99)
    loud["logits"] = np.full_like(loud["logits"], 5000.0)
    # Execute
    log = _round(strategy, 1, [_reply(HOSTILE, 1, loud, "int8"), *_honest(1, "int8")])
    # Assert
    assert [r["node_id"] for r in log.rejected_replies] == [HOSTILE]
    assert "edge logits up to 5000" in log.rejected_replies[0]["reason"]


def test_near_copies_of_another_nodes_features_are_rejected(task_identity) -> None:
    # Prepare: ids local to each node (no partition map); round 1 honest; in round
    # 2 the hostile node sends node 1's round-1 features with one byte changed,
    # under its own ids, and later node 2's round-1 upload replayed whole
    strategy = _strategy("float32", sample_ids=None)
    _round(strategy, 1, _honest(1, "float32"))
    tweaked = _arrays(HONEST[1], "float32", 1)
    tweaked["features"] = tweaked["features"].copy()
    tweaked["features"].reshape(-1)[0] += 0.5
    tweaked["ids"] = HOSTILE_IDS[0] + np.arange(len(HONEST[1]), dtype=np.int64)
    replayed = _arrays(HONEST[2], "float32", 2)
    # Execute
    log2 = _round(strategy, 2, [_reply(HOSTILE, 2, tweaked, "float32"), *_honest(2, "float32")])
    log3 = _round(strategy, 3, [*_honest(3, "float32"), _reply(HOSTILE, 3, replayed, "float32")])
    # Assert: both rejected as near-copies of the right key; no honest node is
    reasons = [r["reason"] for r in log2.rejected_replies + log3.rejected_replies]
    assert [r["node_id"] for r in log2.rejected_replies + log3.rejected_replies] == [HOSTILE] * 2
    assert "nearly equal node key '1'" in reasons[0] and "12 of its 12" in reasons[0]
    assert "node key '2'" in reasons[1]
    assert strategy.store.nodes() == ["1", "2", "3"]


@pytest.mark.parametrize("shared_init", [False, True], ids=["own-extractors", "one-extractor"])
def test_honest_nodes_share_almost_no_sketch(shared_init) -> None:
    # Prepare: the training features of three digits nodes, from their own
    # ResNet-8 stems (or one shared stem), as they would upload them
    config = RunConfig.from_mapping({"dataset": "digits", "shared-extractor-init": shared_init})
    sketches = []
    for partition_id in range(3):
        partition = load_node_partition(partition_id, 3, config)
        edge = edge_model_factory(config, 10, partition_id)().eval()
        with torch.no_grad():
            _, features = edge(partition.train.images)
        payload = FeaturePayload(
            encode_features(features, "int8"),
            np.zeros((len(features), 10), np.float32),
            partition.train.labels.numpy(),
            partition.train.ids.numpy(),
        )
        sketches.append(sample_sketches(payload))
    # Execute: the share of each node's samples whose sketch another node has
    shares = [
        np.isin(mine, np.concatenate([s for j, s in enumerate(sketches) if j != i])).mean()
        for i, mine in enumerate(sketches)
    ]
    # Assert: far below the near-copy share (measured: no sample shares one)
    assert max(shares) < NEAR_COPY_SHARE / 10, shares
