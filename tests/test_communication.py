"""Fewer bytes: lossless compression of the feature bytes (bounded before inflating),
features sent only when they changed, and the extractor frozen after K rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from flwr.app import ArrayRecord, MessageType
from inprocess import InProcessGrid, node_context

from flwr_fedgkt.codec import FEATURE_DTYPES, encode_features, wire_dtype
from flwr_fedgkt.compression import CompressionError, compress, inflate
from flwr_fedgkt.edge import Extracted
from flwr_fedgkt.local import LocalReply
from flwr_fedgkt.rounds import RoundEngine
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import ConfigError, RunConfig
from flwr_fedgkt.strategy import FedGKT

SHAPE = (16, 8, 8)
FEATURES = MessageType.TRAIN, MessageType.EVALUATE


def _extracted(n: int = 6, seed: int = 0) -> Extracted:
    gen = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(n, *SHAPE, generator=gen))
    features[:, :, :4] = 0.0  # post-ReLU maps hold many zeros
    return Extracted(
        features=features,
        logits=torch.randn(n, 10, generator=gen),
        labels=torch.arange(n) % 10,
        ids=torch.arange(100, 100 + n),
    )


def _engine(dtype: str = "float32", compression: str = "zstd", **kwargs) -> RoundEngine:
    trainer = ServerTrainer(10, batch_size=8, seed=0, device="cpu")
    engine = RoundEngine(
        trainer, feature_dtype=dtype, feature_shape=SHAPE, compression=compression, **kwargs
    )
    engine.connected = lambda: [1]
    engine.begin_round(1)
    return engine


def _accept(engine: RoundEngine, arrays: dict, codec: str, dtype: str = "float32"):
    meta = {"server-round": 1, "feature-dtype": dtype, "node-key": "1", "compression": codec}
    reply = LocalReply(1, (meta, arrays, {"num-examples": len(arrays["ids"])}))
    return engine.accept(reply, 1, training=True)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_every_codec_round_trips_every_wire_dtype(dtype, codec) -> None:
    # Prepare
    extracted = _extracted()
    expected = encode_features(extracted.features, dtype)
    arrays = extracted.arrays(dtype, compression=codec)
    # Execute
    accepted = _accept(_engine(dtype, compression=codec), arrays, codec, dtype)
    # Assert: the server holds exactly the bytes the node encoded
    assert accepted is not None, _engine(dtype).current.rejected_replies
    assert accepted.payload.features.data.dtype == wire_dtype(dtype)
    assert np.array_equal(accepted.payload.features.data, expected.data)
    if codec == "zstd":  # 1-D bytes on the wire, fewer of them than the raw features
        assert arrays["features"].dtype == np.uint8 and arrays["features"].ndim == 1
        assert arrays["features"].nbytes < expected.data.nbytes


def test_a_frame_that_would_inflate_beyond_its_samples_is_rejected_uninflated(
    monkeypatch,
) -> None:
    # Prepare: 6 ids (6 x 1024 float32 = 24,576 bytes) but a 64 MB frame of zeros
    extracted = _extracted()
    arrays = extracted.arrays("float32", compression="zstd")
    bomb = np.zeros(64 * 2**20, dtype=np.uint8)
    arrays["features"] = compress(bomb, "zstd")
    assert arrays["features"].nbytes < 10_000  # what the node sends is small

    def no_inflating(*args, **kwargs):
        raise AssertionError("the frame was inflated")

    monkeypatch.setattr(zstandard, "ZstdDecompressor", no_inflating)
    engine = _engine()
    # Execute
    accepted = _accept(engine, arrays, "zstd")
    # Assert
    assert accepted is None
    (rejected,) = engine.current.rejected_replies
    assert rejected["reason"] == (
        f"the zstd frame declares {64 * 2**20} bytes, but its samples' features take "
        f"{6 * 16 * 8 * 8 * 4}; not inflated"
    )


def test_inflating_is_bounded_by_max_reply_bytes_too() -> None:
    # 6 samples of float32 features inflate to 24,576 bytes; the limit is 20,000
    arrays = _extracted().arrays("float32", compression="zstd")
    assert sum(a.nbytes for a in arrays.values()) < 20_000
    engine = _engine(max_reply_bytes=20_000)
    assert _accept(engine, arrays, "zstd") is None
    assert (
        "would inflate to 24576 bytes, beyond max-reply-bytes (20000)"
        in (engine.current.rejected_replies[0]["reason"])
    )


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"not a frame at all", "not a zstd frame"),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 24_576),
            "does not declare its content size",
        ),
        (compress(np.zeros(24_576, np.uint8), "zstd").tobytes()[:-8] + b"\1" * 8, "corrupt"),
    ],
)
def test_frames_that_are_not_what_they_claim_are_rejected(frame, reason) -> None:
    blob = np.frombuffer(frame, dtype=np.uint8)
    with pytest.raises(CompressionError, match=reason):
        inflate(blob, "zstd", 24_576)


def test_a_reply_may_use_no_codec_or_the_rounds_but_no_other() -> None:
    extracted = _extracted()
    assert _accept(_engine(compression="zstd"), extracted.arrays("float32"), "none") is not None
    engine = _engine(compression="none")
    zstd_arrays = extracted.arrays("float32", compression="zstd")
    assert _accept(engine, zstd_arrays, "zstd") is None
    assert engine.current.rejected_replies[0]["reason"] == (
        "compression 'zstd', the round uses 'none'"
    )


# -- whole rounds, in process -----------------------------------------------------------
def _run(rounds: int, run_config: dict, **strategy_kwargs) -> tuple[FedGKT, InProcessGrid]:
    run_config = {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 40,
        "batch-size": 16,
        "seed": 3,
        **run_config,
    }
    contexts = {101 + i: node_context(101 + i, i, 2, run_config) for i in range(2)}
    grid = InProcessGrid(contexts)
    config = RunConfig.from_mapping({**run_config, "device": "cpu"})
    strategy = FedGKT(
        ServerTrainer.from_run_config(config, num_classes=10),
        feature_dtype="int8",
        seed=3,
        **strategy_kwargs,
    )
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds)
    return strategy, grid


def _sent_features(grid: InProcessGrid, kind: str) -> dict[int, list[int]]:
    """The rounds in which each node's reply of ``kind`` carried features."""
    sent: dict[int, list[int]] = {}
    for (node, k, server_round), names in sorted(grid.uploads.items()):
        if k == kind and "features" in names:
            sent.setdefault(node, []).append(server_round)
    return sent


def test_compression_changes_the_bytes_and_nothing_else(task_identity) -> None:
    # Execute: the same two rounds, uncompressed and with zstd
    plain, _ = _run(2, {}, compression="none")
    packed, _ = _run(2, {})  # zstd: the default
    # Assert: lossless, so the same server model and the same scores, fewer bytes
    for ours, theirs in zip(plain.engine.history, packed.engine.history, strict=True):
        for key in ("accuracy", "loss", "edge_accuracy", "server_train_loss"):
            assert ours[key] == theirs[key], key
        assert theirs["bytes_up"] < ours["bytes_up"] / 1.3
    # cumulative bytes: the running sums of the rounds' bytes
    first, second = packed.engine.history
    assert first["cumulative_bytes_up"] == first["bytes_up"]
    assert second["cumulative_bytes_up"] == first["bytes_up"] + second["bytes_up"]
    assert second["cumulative_bytes_down"] == first["bytes_down"] + second["bytes_down"]


def test_freeze_after_k_rounds_sends_features_while_the_extractor_trains(task_identity) -> None:
    # Execute: the extractor trains in rounds 1-2 and is frozen in rounds 3-5
    strategy, grid = _run(5, {}, freeze_after=2)
    # Assert: every node sends training and test features in rounds 1 and 2 only
    # (its round-2 upload already holds the frozen extractor's features); later
    # replies carry ids and logits (training) or ids (evaluation)
    for kind in FEATURES:
        assert _sent_features(grid, kind) == {101: [1, 2], 102: [1, 2]}, kind
    for node in (101, 102):
        assert grid.uploads[(node, MessageType.TRAIN, 5)] == ["ids", "logits"]
        assert grid.uploads[(node, MessageType.EVALUATE, 5)] == ["ids"]
    history = strategy.engine.history
    assert [r["cached_feature_nodes"] for r in history] == [0, 0, 2, 2, 2]
    assert [r["cached_test_nodes"] for r in history] == [0, 0, 2, 2, 2]
    assert history[3]["bytes_up"] * 20 < history[1]["bytes_up"]
    # the server kept training and scoring on the features it holds
    assert all(r["accuracy"] is not None for r in history)
    assert history[4]["eval_samples"] == history[0]["eval_samples"] > 0
    assert all(r["rejected_replies"] == [] for r in history)


def test_without_freezing_a_training_node_sends_its_features_every_round(task_identity) -> None:
    _, grid = _run(3, {})
    for kind in FEATURES:
        assert _sent_features(grid, kind) == {101: [1, 2, 3], 102: [1, 2, 3]}, kind


def test_a_node_that_did_not_train_since_its_last_test_upload_sends_no_test_features(
    task_identity,
) -> None:
    # Prepare / Execute: one of the two nodes trains per round, both are evaluated
    _, grid = _run(4, {}, fraction_train=0.5, min_train_nodes=1)
    # Assert: a node's evaluation carries features exactly when its extractor
    # changed (it trained) since its last test upload, or it has sent none yet
    trained = {(node, r) for (node, kind, r) in grid.uploads if kind == MessageType.TRAIN}
    assert 0 < len(trained) == 4  # one node per round
    for node in (101, 102):
        last_upload = None
        for server_round in range(1, 5):
            names = grid.uploads[(node, MessageType.EVALUATE, server_round)]
            changed = last_upload is None or any(
                (node, r) in trained for r in range(last_upload + 1, server_round + 1)
            )
            assert ("features" in names) == changed, (node, server_round, names)
            if changed:
                last_upload = server_round


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({"freeze-after": 2, "freeze-extractor": True}, "not both"),
        ({"freeze-after": -2}, "freeze-after"),
        ({"compression": "lzma"}, "compression"),
    ],
)
def test_communication_settings_are_checked(mapping, match) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(mapping)
    assert RunConfig.from_mapping({"freeze-after": 3}).freeze_after == 3


def test_compact_features_are_3_kib_per_sample_and_train_the_server(task_identity) -> None:
    # Execute: the compact pair, features uncompressed so their bytes are the codes'
    strategy, grid = _run(2, {"compact-features": True}, compression="none")
    # Assert: 3 x 32 x 32 int8 codes per sample, 3,072 bytes (the raw image's size)
    store = strategy.engine.store
    for key in store.nodes():
        payload = store.payload(key)
        assert payload.features.data.shape[1:] == (3, 32, 32)
        assert payload.features.data.nbytes == 3 * 1024 * payload.num_samples
    assert strategy.trainer.model_name == "resnet55-compact"
    assert all(r["accuracy"] is not None for r in strategy.engine.history)
    assert all(r["rejected_replies"] == [] for r in strategy.engine.history)
