"""Checkpoint and resume, and a round with faulty nodes, through the real strategy
and the real ClientApp functions (messages delivered in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import set_task_identity
from flwr.app import Array, ArrayRecord, Message
from inprocess import InProcessGrid, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.checkpoint import CheckpointError, load_latest_checkpoint, save_checkpoint
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.strategy import FedGKT

ROUNDS = 4


def _run_config(state_dir: Path) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 40,
        "num-server-rounds": ROUNDS,
        "batch-size": 16,
        "server-epochs": 1,
        "seed": 7,
        "feature-dtype": "float16",
        "client-state-dir": str(state_dir),
    }


def _strategy(run_config: dict, checkpoint_dir: Path | None = None) -> FedGKT:
    config = RunConfig.from_mapping({**run_config, "device": "cpu"})
    trainer = ServerTrainer.from_run_config(config, num_classes=10)
    return FedGKT(
        trainer,
        server_epochs=config.server_epochs,
        feature_dtype=config.feature_dtype,
        checkpoint_dir=checkpoint_dir,
    )


def _grid(run_config: dict, first_id: int = 101, **kwargs) -> InProcessGrid:
    # two of four partitions, with fixed node ids
    contexts = {first_id + i: node_context(first_id + i, i, 4, run_config) for i in range(2)}
    return InProcessGrid(contexts, **kwargs)


def _start(strategy: FedGKT, grid: InProcessGrid, num_rounds: int) -> None:
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=num_rounds)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The rounds of the uninterrupted run that the resumed runs are compared with
    (two of four partitions, node ids 101 and 102)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_task_identity(monkeypatch)
        config = _run_config(tmp_path_factory.mktemp("whole-clients"))
        whole = _strategy(config)
        _start(whole, _grid(config), ROUNDS)
    return whole.history


def test_a_resumed_run_reaches_the_same_round_4_as_an_uninterrupted_one(
    task_identity, tmp_path, uninterrupted
) -> None:
    # Prepare / Execute: (the uninterrupted run of four rounds) and a run stopped
    # after round 2, resumed by a new server and new node contexts (as after a
    # restart), from the checkpoint and the client state dir
    split_config = _run_config(tmp_path / "split-clients")
    first = _strategy(split_config, tmp_path / "ckpt")
    _start(first, _grid(split_config), 2)
    resumed = _strategy(split_config, tmp_path / "ckpt")
    state, path, skipped = load_latest_checkpoint(tmp_path / "ckpt")
    resumed.engine.load_state_dict(state)
    _start(resumed, _grid(split_config), ROUNDS - resumed.engine.round_offset)
    # Assert
    assert path.name == "checkpoint-round-2.pt" and skipped == []
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    for key in ("accuracy", "loss", "edge_accuracy", "server_train_loss"):
        assert resumed.history[-1][key] == pytest.approx(
            uninterrupted[-1][key], rel=1e-4, abs=1e-6
        ), key
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == [
        "checkpoint-round-3.pt",
        "checkpoint-round-4.pt",
    ]


RESUMED_FIELDS = ("accuracy", "loss", "edge_accuracy", "edge_train_kd", "server_train_loss")


@pytest.mark.parametrize("node_ahead", [False, True], ids=["in-step", "node-ahead"])
def test_a_restarted_federation_with_new_node_ids_resumes_exactly(
    task_identity, tmp_path, node_ahead, uninterrupted
) -> None:
    # Prepare / Execute: (the uninterrupted run) and a run whose server stops
    # after round 2's checkpoint; with node_ahead the nodes have trained round 3
    # already (the server died before its end)
    split_config = _run_config(tmp_path / "split-clients")
    first = _strategy(split_config, tmp_path / "ckpt")
    _start(first, _grid(split_config), 3 if node_ahead else 2)
    (tmp_path / "ckpt" / "checkpoint-round-3.pt").unlink(missing_ok=True)
    # the whole federation restarts: new server, new node ids, empty contexts
    resumed = _strategy(split_config, tmp_path / "ckpt")
    resumed.engine.load_state_dict(load_latest_checkpoint(tmp_path / "ckpt")[0])
    _start(resumed, _grid(split_config, first_id=501), ROUNDS - resumed.engine.round_offset)
    # Assert: rounds 3 and 4 equal the uninterrupted run's ...
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    for expected, got in zip(uninterrupted[2:], resumed.history[2:], strict=True):
        for key in RESUMED_FIELDS:
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (
                got["round"],
                key,
            )
    # ... and in round 3 every node got its server logits (KD targets) back
    round_3 = resumed.history[2]
    assert round_3["bytes_down"] == uninterrupted[2]["bytes_down"] > 0
    assert round_3["edge_train_kd"] > 0


def test_partial_participation_with_the_disk_store_resumes_exactly(task_identity, tmp_path) -> None:
    """Half of four nodes train each round, sampled by key; the server keeps the
    uploads on disk, and the round it died in had written some already."""

    def strategy(run_config: dict, name: str, checkpoints: bool) -> FedGKT:
        config = RunConfig.from_mapping({**run_config, "device": "cpu"})
        return FedGKT(
            ServerTrainer.from_run_config(config, num_classes=10),
            feature_dtype="int8",
            fraction_train=0.5,
            min_train_nodes=1,
            store=FeatureStore(tmp_path / name),
            checkpoint_dir=tmp_path / "ckpt" if checkpoints else None,
            seed=config.seed,
        )

    def grid(run_config: dict, node_ids: list[int]) -> InProcessGrid:
        # node_ids[i] holds partition i
        contexts = {n: node_context(n, i, 4, run_config) for i, n in enumerate(node_ids)}
        return InProcessGrid(contexts)

    # Prepare / Execute: the uninterrupted run
    whole_config = _run_config(tmp_path / "whole-clients")
    whole = strategy(whole_config, "whole-store", checkpoints=False)
    _start(whole, grid(whole_config, [101, 102, 103, 104]), ROUNDS)
    # ... and one whose server died in round 3 (after its uploads were stored)
    split_config = _run_config(tmp_path / "split-clients")
    first = strategy(split_config, "split-store", checkpoints=True)
    _start(first, grid(split_config, [101, 102, 103, 104]), 3)
    (tmp_path / "ckpt" / "checkpoint-round-3.pt").unlink()
    # the federation restarts: new server (same store folder), new node ids in
    # another order than the partitions' (sampling must go by key)
    resumed = strategy(split_config, "split-store", checkpoints=True)
    resumed.engine.load_state_dict(load_latest_checkpoint(tmp_path / "ckpt")[0])
    _start(resumed, grid(split_config, [704, 702, 701, 703]), ROUNDS - resumed.engine.round_offset)
    # Assert: two nodes trained per round, and rounds 3-4 are the uninterrupted ones
    assert [r["train_nodes"] for r in resumed.history] == [2, 2, 2, 2]
    for expected, got in zip(whole.history[2:], resumed.history[2:], strict=True):
        for key in (*RESUMED_FIELDS, "stored_nodes", "stored_samples"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (
                got["round"],
                key,
            )
    # the store's folder holds the current uploads and those a kept checkpoint names
    files = list((tmp_path / "split-store").glob("node-*"))
    assert len(files) <= 4 * len(resumed.store)


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path) -> None:
    # Prepare
    save_checkpoint(tmp_path, 1, {"value": np.arange(1000)})
    newest = save_checkpoint(tmp_path, 2, {"value": np.arange(2000)})
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # killed mid-write
    # Execute
    state, path, skipped = load_latest_checkpoint(tmp_path)
    # Assert
    assert path.name == "checkpoint-round-1.pt" and state["round"] == 1
    assert len(skipped) == 1 and "checkpoint-round-2.pt" in skipped[0]
    newest.unlink()
    (tmp_path / "checkpoint-round-1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest_checkpoint(tmp_path)


def _malformed(msg: Message, context) -> Message:
    reply = client_app.train(msg, context)
    arrays = reply.content.array_records["features"]
    arrays["labels"] = Array(np.full(arrays["labels"].numpy().shape, 99, dtype=np.int64))
    return reply


def _raises(msg: Message, context) -> Message:
    raise RuntimeError("disk full on this node")


def test_the_round_goes_on_when_nodes_misbehave_raise_or_stay_silent(
    task_identity, tmp_path
) -> None:
    # Prepare: nodes 101 and 102 behave; 103 replies garbage, 104 raises, 105 is silent
    config = {**_run_config(tmp_path / "clients"), "num-server-rounds": 1}
    contexts = {node: node_context(node, i, 5, config) for i, node in enumerate(range(101, 106))}
    grid = InProcessGrid(
        contexts,
        handlers={(103, "train"): _malformed, (104, "train"): _raises},
        silent={105},
    )
    strategy = _strategy(config)
    strategy.min_available_nodes = 5
    # Execute
    _start(strategy, grid, 1)
    # Assert
    record = strategy.history[-1]
    assert record["train_nodes"] == 2 and strategy.store.nodes() == ["0", "1"]
    assert [r["node_id"] for r in record["rejected_replies"]] == [103]
    assert "labels out of range" in record["rejected_replies"][0]["reason"]
    failed = {f["node_id"]: f["reason"] for f in record["failed_nodes"]}
    assert "disk full on this node" in failed[104]
    assert "no reply" in failed[105]
    assert record["accuracy"] is not None and record["eval_nodes"] == 4  # 105 stays silent
