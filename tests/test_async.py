"""Asynchronous FedGKT: no round barrier; bounded staleness; the same validation,
checkpoints and records as rounds.

The end-to-end tests drive the real strategy over :class:`inprocess.AsyncGrid`
(Flower's push/pull Message API in process, each node in a thread of its own,
the real ClientApp functions); every wait in them is for an event, not a time.
The hostile-reply test drives :class:`~flwr_fedgkt.continuous.ContinuousServer`
by hand, one epoch at a time, with the round tests' own cases.
"""

from __future__ import annotations

import re
import threading
import tomllib

import numpy as np
import pytest
from conftest import make_message
from flower_processes import REPO
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from inprocess import AsyncGrid, node_context
from test_hostile_replies import CASES, HONEST, HOSTILE, _honest, _hostile
from test_hostile_replies import _strategy as hostile_strategy

from flwr_fedgkt import client_app
from flwr_fedgkt.asynchronous import AsyncFedGKT
from flwr_fedgkt.checkpoint import load_latest_checkpoint
from flwr_fedgkt.continuous import ContinuousServer, Instruction
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    METRICS_KEY,
    TEST_FEATURES_KEY,
    TEST_METRICS_KEY,
    MessageReply,
)
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import ConfigError, RunConfig

RUN_CONFIG = {
    "dataset": "synthetic",
    "synthetic-samples-per-node": 40,
    "batch-size": 16,
    "seed": 3,
    "torch-threads": 1,
}
WAIT = 120.0  # seconds an event may take before the test fails (never reached when right)


def _strategy(**kwargs) -> AsyncFedGKT:
    config = RunConfig.from_mapping({**RUN_CONFIG, "device": "cpu", "precision": "float32"})
    trainer = ServerTrainer.from_run_config(config, num_classes=10)
    kwargs.setdefault("min_available_nodes", 1)
    return AsyncFedGKT(trainer, feature_dtype="int8", seed=3, **kwargs)


def _contexts(nodes: int, partitions: int, first: int = 101, config: dict | None = None):
    config = RUN_CONFIG if config is None else config
    return {first + i: node_context(first + i, i, partitions, config) for i in range(nodes)}


def _run(strategy: AsyncFedGKT, grid: AsyncGrid, epochs: int) -> None:
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=epochs)
    finally:
        grid.close()


def _sent(events: list[tuple[str, int, int]], node: int) -> list[int]:
    return [i for i, (kind, n, _) in enumerate(events) if kind == "sent" and n == node]


def _replied(events: list[tuple[str, int, int]], node: int) -> list[int]:
    return [i for i, (kind, n, _) in enumerate(events) if kind == "replied" and n == node]


def test_a_slow_node_never_delays_another_nodes_next_instruction(task_identity) -> None:
    # Prepare: node 102 holds its first reply back until node 101 has been sent
    # its third instruction; behind a round barrier that would never happen
    strategy = _strategy()
    third_sent = threading.Event()
    counts = {"fast": 0}

    def fast(msg: Message, context) -> Message:
        counts["fast"] += 1
        if counts["fast"] >= 3:
            third_sent.set()
        return client_app.train(msg, context)

    def slow(msg: Message, context) -> Message:
        third_sent.wait(WAIT)
        return client_app.train(msg, context)

    grid = AsyncGrid(
        _contexts(2, 2), {(101, MessageType.TRAIN): fast, (102, MessageType.TRAIN): slow}
    )
    # Execute
    _run(strategy, grid, epochs=4)
    # Assert: node 101's second and third instructions went out while node 102's
    # first was still out, each right after node 101's previous reply
    events = grid.events
    fast_sent, slow_replied = _sent(events, 101), _replied(events, 102)
    assert third_sent.is_set()
    assert slow_replied and fast_sent[2] < slow_replied[0]
    fast_replied = _replied(events, 101)
    assert fast_replied[0] < fast_sent[1] and fast_replied[1] < fast_sent[2]
    # tasks (server-round) grow per node: each node restores its newest state
    for node in (101, 102):
        tasks = [task for kind, n, task in events if kind == "sent" and n == node]
        assert tasks == sorted(set(tasks))
    assert strategy.server is not None and strategy.server.version == 4


def test_a_reply_older_than_max_logit_age_is_stored_and_flagged(task_identity) -> None:
    # Prepare: node 102 answers an instruction that carries server logits only
    # after the server has trained two more epochs (max-logit-age 1)
    strategy = _strategy(max_logit_age=1)
    held_back: list[int] = []

    def late(msg: Message, context) -> Message:
        server = strategy.server
        assert server is not None
        if LOGITS_KEY in msg.content.array_records and not held_back:
            version = server.version
            held_back.append(version)
            while server.version < version + 2 and not server.done:
                server.wait(0.01)
        return client_app.train(msg, context)

    grid = AsyncGrid(_contexts(2, 2), {(102, MessageType.TRAIN): late})
    # Execute
    _run(strategy, grid, epochs=8)
    # Assert: the late reply is counted as flagged, and its features were stored
    history = strategy.history
    flagged = [r for r in history if r["staleness"]["flagged"]]
    assert held_back and len(flagged) == 1
    assert flagged[0]["staleness"]["logit_age_max"] >= 2
    assert flagged[0]["replies_by_node"].get("1", 0) >= 1  # node 102 is partition 1
    assert strategy.store.last_round("1") >= held_back[0] + 2


def test_records_carry_the_asynchronous_fields(task_identity) -> None:
    # Prepare
    strategy = _strategy(eval_every=2)
    grid = AsyncGrid(_contexts(2, 2))
    # Execute
    _run(strategy, grid, epochs=6)
    # Assert: one record every two server epochs, numbered as evaluations
    history = strategy.history
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [r["server_version"] for r in history] == [2, 4, 6]
    walls = [r["wall_seconds"] for r in history]
    assert walls == sorted(walls) and walls[0] > 0
    for record in history:
        assert set(record["replies_by_node"]) <= {"0", "1"}
        assert sum(record["replies_by_node"].values()) >= 1
        assert record["staleness"]["server_epochs"] == 2
        assert record["staleness"]["max_logit_age"] == 4
        assert record["accuracy"] is not None and record["eval_nodes"] == 2
    # replies are counted once: the records' counts add up to the uploads
    replies = sum(sum(r["replies_by_node"].values()) for r in history)
    assert replies <= len(_replied(grid.events, 101)) + len(_replied(grid.events, 102))


def _with_test_upload(train: Message, test: Message, meta_of: Message) -> Message:
    """A training reply that carries ``test`` (an evaluation reply) as its test
    upload, with the meta record of ``meta_of`` (one meta for both uploads)."""
    content = RecordDict(
        {
            FEATURES_KEY: train.content.array_records[FEATURES_KEY],
            METRICS_KEY: train.content.metric_records[METRICS_KEY],
            TEST_FEATURES_KEY: test.content.array_records[FEATURES_KEY],
            TEST_METRICS_KEY: test.content.metric_records[METRICS_KEY],
            "meta": meta_of.content.config_records["meta"],
        }
    )
    return make_message(
        content,
        src_node_id=train.metadata.src_node_id,
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_reply_is_rejected_as_in_rounds(task_identity, case) -> None:
    # Prepare: the round tests' case; the server takes replies as an asynchronous
    # run does (training reply and its test upload), one epoch after each batch
    dtype, phase, build, reason = CASES[case]
    records: list[dict] = []
    engine = hostile_strategy(dtype, on_round_end=records.append).engine
    engine.connected = lambda: {*HONEST, HOSTILE}  # as the run's grid reports them
    server = ContinuousServer(engine, total_epochs=2)
    for task in (1, 2):
        honest_like = _hostile()
        hostile_train = (build if phase == "train" else honest_like)(task, dtype, True)
        hostile_test = (build if phase == "evaluate" else honest_like)(task, dtype, False)
        pairs = [
            *zip(_honest(task, dtype), _honest(task, dtype, training=False), strict=True),
            (hostile_train, hostile_test),
        ]
        # Execute
        for train, test in pairs:
            reply = _with_test_upload(train, test, test if phase == "evaluate" else train)
            ins = Instruction(task, None, None, True)
            server.accept(MessageReply(reply), MessageReply(reply, test=True), ins)
        assert server.epoch()
    # Assert: a record per epoch, the hostile reply rejected in each with the
    # rounds' reason (its test upload too when it shares the faulty meta), the
    # honest nodes trained and scored
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        rejected = record["rejected_replies"]
        assert 1 <= len(rejected) <= 2 and {r["node_id"] for r in rejected} == {HOSTILE}
        assert all(re.search(reason, r["reason"]) for r in rejected), rejected
        assert {"1", "2", "3"} <= set(record["replies_by_node"])
        if phase == "train":
            assert "9" not in record["replies_by_node"]
        assert np.isfinite(record["accuracy"]) and np.isfinite(record["server_train_loss"])
    assert all(bool(t.isfinite().all()) for t in engine.trainer.model.state_dict().values())
    assert set(HONEST) | {HOSTILE} >= {int(k) for k in engine.store.nodes()}


def test_a_test_upload_is_scored_once_the_server_trained_on_its_features(task_identity) -> None:
    # Prepare: nodes 1-3 reply before the first epoch; node 9's reply (training
    # features and test upload from the same extractor) arrives while the
    # first epoch trains, so that epoch never saw its features
    records: list[dict] = []
    engine = hostile_strategy("int8", on_round_end=records.append).engine
    server = ContinuousServer(engine, total_epochs=2)
    ins = Instruction(1, None, None, True)

    def accept(train: Message, test: Message) -> None:
        reply = _with_test_upload(train, test, train)
        server.accept(MessageReply(reply), MessageReply(reply, test=True), ins)

    for train, test in zip(_honest(1, "int8"), _honest(1, "int8", training=False), strict=True):
        accept(train, test)
    late = _hostile()  # an honest reply from node 9
    train_epoch = engine.trainer.train

    def arrives_mid_epoch(*args, **kwargs):
        if not records:
            accept(late(1, "int8", True), late(1, "int8", False))
        return train_epoch(*args, **kwargs)

    engine.trainer.train = arrives_mid_epoch
    # Execute
    assert server.epoch() and server.epoch()
    # Assert: the first record scores nodes 1-3 alone; node 9 from the second on,
    # after an epoch that trained on its features
    assert [r["eval_nodes"] for r in records] == [3, 4]
    assert "9" not in records[0]["node_accuracy"] and "9" in records[1]["node_accuracy"]
    assert engine.store.last_round("9") == 1


def test_a_killed_async_run_resumes_from_its_checkpoint(task_identity, tmp_path) -> None:
    # Prepare: a run that dies as it writes its third record (as a killed
    # ServerApp would, mid-run), checkpointing every epoch
    nodes = str(tmp_path / "nodes")  # 150 samples each: enough to learn in six epochs
    config = {**RUN_CONFIG, "synthetic-samples-per-node": 150, "client-state-dir": nodes}

    class Killed(RuntimeError):
        pass

    def die_after_three(record: dict) -> None:
        if record["round"] == 3:
            raise Killed

    first = _strategy(checkpoint_dir=tmp_path / "ckpt", on_round_end=die_after_three)
    with pytest.raises(Killed):
        _run(first, AsyncGrid(_contexts(2, 2, config=config)), epochs=10)
    state, path, _ = load_latest_checkpoint(tmp_path / "ckpt")
    # Execute: a new server (and new node contexts) resumes from the checkpoint
    resumed = _strategy(checkpoint_dir=tmp_path / "ckpt")
    resumed.engine.load_state_dict(state)
    checkpointed = resumed.history[-1]
    _run(resumed, AsyncGrid(_contexts(2, 2, first=201, config=config)), epochs=6)
    # Assert: the newest checkpoint is the epoch before the record that died
    # (records are written before the epoch's checkpoint); what it holds is exact
    # (records, server version); the resumed run continues its numbering and
    # regains the checkpointed accuracy within two records
    assert path.name == "checkpoint-round-2.pt"
    assert state["server_version"] == 2 and state["round"] == 2
    assert [r["round"] for r in resumed.history[:2]] == [1, 2]
    assert resumed.history[:2] == first.history[:2]
    after = resumed.history[2:]
    assert [r["server_version"] for r in after] == [3, 4, 5, 6]
    assert [r["round"] for r in after] == [3, 4, 5, 6]
    assert max(r["accuracy"] for r in after[:2]) >= checkpointed["accuracy"]


def test_nodes_join_and_leave_mid_run(task_identity) -> None:
    # Prepare: node 101 alone at first; node 102 joins after the first record,
    # node 101 leaves after the third
    grid = AsyncGrid(_contexts(2, 2))
    grid.connected = {101}

    def membership(record: dict) -> None:
        if record["round"] == 1:
            grid.connected.add(102)
        if record["round"] == 3:
            grid.connected.discard(101)

    strategy = _strategy(on_round_end=membership)
    # Execute
    _run(strategy, grid, epochs=8)
    # Assert: partition 1 (node 102) takes part once it joined, partition 0
    # (node 101) no more once it left; the run went on to its end
    history = strategy.history
    assert set(history[0]["replies_by_node"]) == {"0"}
    assert any("1" in r["replies_by_node"] for r in history[1:])
    assert all("0" not in r["replies_by_node"] for r in history[5:])
    assert history[-1]["server_version"] == 8


def test_mode_and_pipeline_cannot_disagree() -> None:
    assert RunConfig.from_mapping({"pipeline": True}).schedule == "pipeline"
    assert RunConfig.from_mapping({"mode": "async"}).schedule == "async"
    # the app's pyproject.toml holds mode = "sync", so a run config that only says
    # pipeline = true reaches the ServerApp as both keys: that is pipelined rounds
    assert RunConfig.from_mapping({"pipeline": True, "mode": "sync"}).schedule == "pipeline"
    app_config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    merged = {**app_config["config"], "pipeline": True}  # flwr run --run-config pipeline=true
    assert RunConfig.from_mapping(merged).schedule == "pipeline"
    with pytest.raises(ConfigError, match="'mode' = 'async'.*'pipeline' = true"):
        RunConfig.from_mapping({"pipeline": True, "mode": "async"})
    with pytest.raises(ConfigError, match="mode"):
        RunConfig.from_mapping({"mode": "rounds"})
    for key, bad in (("eval-every", 0), ("checkpoint-every", 0), ("time-budget", -1)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_mapping({key: bad})
