"""One hostile node must never stop the run or spoil the server model.

Each case sends a reply that Flower's record API allows but that is wrong, through
the real strategy, beside three honest nodes, for two rounds. The hostile reply is
rejected with its reason, the honest nodes are trained and scored in both rounds,
and the server model and the server logits stay finite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from inprocess import InProcessGrid, node_context, server_context

from flwr_fedgkt.codec import EncodedFeatures, FeaturePayload, encode_features
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    arrays_record,
    record_arrays,
)
from flwr_fedgkt.results import ResultsWriter
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.strategy import FedGKT

SHAPE = (16, 4, 4)
CLASSES = 10
HONEST = {1: np.arange(0, 12), 2: np.arange(100, 110), 3: np.arange(200, 216)}
HOSTILE = 9
HOSTILE_IDS = np.arange(300, 308)


PARTITIONS = {str(node): ids for node, ids in {**HONEST, HOSTILE: HOSTILE_IDS}.items()}


def partition_ids(key: str, split: str) -> np.ndarray | None:
    """Each key's partition, as the built-in app's server knows it: training ids,
    and the test ids 1000 above them."""
    ids = PARTITIONS.get(key)
    return None if ids is None else ids + (0 if split == "train" else 1000)


def _strategy(dtype: str = "int8", **kwargs) -> FedGKT:
    trainer = ServerTrainer(CLASSES, batch_size=8, seed=0, device="cpu")
    kwargs.setdefault("global_sample_ids", True)
    kwargs.setdefault("sample_ids", partition_ids)
    return FedGKT(
        trainer,
        feature_dtype=dtype,
        feature_shape=SHAPE,
        min_available_nodes=1,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        **kwargs,
    )


def _arrays(ids: np.ndarray, dtype: str, seed: int, training: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = len(ids)
    features = torch.relu(torch.randn(n, *SHAPE, generator=gen)) + 0.5  # non-zero offsets
    arrays = encode_features(features, dtype).arrays()
    arrays.update(labels=(ids % CLASSES).astype(np.int64), ids=ids.astype(np.int64))
    if training:
        arrays["logits"] = torch.randn(n, CLASSES, generator=gen).numpy()
    return arrays


def _reply(
    node_id: int,
    server_round: int,
    arrays: dict,
    dtype: str,
    training: bool = True,
    key: object = None,
    metrics: dict | None = None,
    meta: dict | None = None,
) -> Message:
    n = len(arrays["ids"])
    values = {"num-examples": n}
    values.update(
        {"train_loss": 1.0, "train_accuracy": 0.5}
        if training
        else {"edge_accuracy": 0.5, "edge_loss": 1.0}
    )
    values.update(metrics or {})
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord(values),
            META_KEY: ConfigRecord(
                {
                    "server-round": server_round,
                    "feature-dtype": dtype,
                    "node-key": str(node_id) if key is None else key,
                    **(meta or {}),
                }
            ),
        }
    )
    kind = MessageType.TRAIN if training else MessageType.EVALUATE
    return make_message(content, src_node_id=node_id, dst_node_id=0, message_type=kind)


def _honest(server_round: int, dtype: str, training: bool = True) -> list[Message]:
    return [
        _reply(
            node,
            server_round,
            _arrays(ids + (0 if training else 1000), dtype, node, training),
            dtype,
            training,
        )
        for node, ids in HONEST.items()
    ]


def _finite_model(strategy: FedGKT) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in strategy.trainer.model.state_dict().values())


def _with(arrays: dict, **changes) -> dict:
    return {**arrays, **changes}


# Each case: (feature dtype, phase, builds the hostile reply, expected reason)
Build = Callable[[int, str, bool], Message]


def _hostile(arrays_change: Callable[[dict], dict] | None = None, **reply_kwargs) -> Build:
    def build(server_round: int, dtype: str, training: bool) -> Message:
        arrays = _arrays(HOSTILE_IDS + (0 if training else 1000), dtype, 99, training)
        if arrays_change is not None:
            arrays = arrays_change(arrays)
        return _reply(HOSTILE, server_round, arrays, dtype, training, **reply_kwargs)

    return build


def _scale(value: float) -> Callable[[dict], dict]:
    def change(arrays: dict) -> dict:
        return _with(arrays, feature_scale=np.full(SHAPE[0], value, dtype=np.float32))

    return change


CASES: dict[str, tuple[str, str, Build, str]] = {
    "list-valued train metric": (
        "int8",
        "train",
        _hostile(metrics={"train_loss": [1.0, 2.0]}),
        "'train_loss' is a list",
    ),
    "list-valued evaluate metric": (
        "int8",
        "evaluate",
        _hostile(metrics={"edge_accuracy": [0.5]}),
        "'edge_accuracy' is a list",
    ),
    "float32 features near 3e38": (
        "float32",
        "train",
        _hostile(lambda a: _with(a, features=np.full_like(a["features"], 3e38))),
        "max-feature-abs",
    ),
    "float16 features far above the other nodes": (
        "float16",
        "train",
        _hostile(lambda a: _with(a, features=np.full_like(a["features"], 60000))),
        "the other nodes' median",
    ),
    "int8 scale 1e37": ("int8", "train", _hostile(_scale(1e37)), "max-feature-abs"),
    "int8 zero scale": ("int8", "train", _hostile(_scale(0.0)), "must be positive"),
    "int8 negative scale": ("int8", "train", _hostile(_scale(-0.1)), "must be positive"),
    "int8 absurd offset": (
        "int8",
        "evaluate",
        _hostile(lambda a: _with(a, feature_offset=np.full(SHAPE[0], -1e30, np.float32))),
        "max-feature-abs",
    ),
    "absurd edge logits": (
        "int8",
        "train",
        _hostile(lambda a: _with(a, logits=np.full_like(a["logits"], 1e30))),
        "beyond the bound",
    ),
    "edge accuracy of 1e6": (
        "int8",
        "evaluate",
        _hostile(metrics={"edge_accuracy": 1e6}),
        "outside \\[0, 1\\]",
    ),
    "negative num-examples": (
        "int8",
        "train",
        _hostile(metrics={"num-examples": -8}),
        "'num-examples' = -8",
    ),
    "num-examples that disagree": (
        "int8",
        "evaluate",
        _hostile(metrics={"num-examples": 800}),
        "carries 8 samples",
    ),
    "NaN train loss": ("int8", "train", _hostile(metrics={"train_loss": float("nan")}), "nan"),
    "ids another node owns": (
        "int8",
        "train",
        _hostile(lambda a: _with(a, ids=HONEST[1][:8].astype(np.int64))),
        "8 sample id\\(s\\) \\(0, 1, 2, 3, 4, ...\\) are not in node key '9'",
    ),
    "ids outside the data set": (
        "int8",
        "evaluate",
        _hostile(lambda a: _with(a, ids=np.arange(50_000, 50_008, dtype=np.int64))),
        "are not in node key '9''s partition \\(test split\\)",
    ),
    "a key without a partition": (
        "int8",
        "train",
        _hostile(key="77"),
        "names no partition|already speaks for node key '9'",  # round 1 | round 2
    ),
    "uint64 ids near 2**63": (
        "int8",
        "train",
        _hostile(lambda a: _with(a, ids=np.arange(2**63, 2**63 + 8, dtype=np.uint64))),
        "does not fit in int64",
    ),
    "the key of a connected node": (
        "int8",
        "train",
        _hostile(key="1"),
        "still connected|already speaks for",
    ),
    "a node key that is not a string": ("int8", "train", _hostile(key=7), "node-key is a int"),
    "an empty node key": ("int8", "evaluate", _hostile(key=""), "printable characters"),
    "a defence that is text": (
        "int8",
        "train",
        _hostile(meta={"privacy-feature-noise": "lots"}),
        "defences: privacy-feature-noise = 'lots' is not a number",
    ),
    "a negative noise": (
        "int8",
        "train",
        _hostile(meta={"privacy-feature-noise": -1.0, "privacy-feature-clip": 1.0}),
        r"defences: feature-noise = -1.0 must lie in \[0, 10000\]",
    ),
    "a noise that is not a number": (
        "bfloat16",
        "train",
        _hostile(meta={"privacy-feature-noise": float("nan"), "privacy-feature-clip": 1.0}),
        "defences: feature-noise = nan must lie in",
    ),
    "an absurd noise": (
        "float16",
        "evaluate",
        _hostile(meta={"privacy-feature-noise": 1e300, "privacy-feature-clip": 1.0}),
        "defences: feature-noise = 1e[+]?300",
    ),
    "a label epsilon that keeps labels with probability 1/K": (
        "int8",
        "evaluate",
        _hostile(meta={"privacy-label-epsilon": 1e-300}),
        "defences: label-epsilon = 1e-300 must be 0",
    ),
    "noise without a clip": (
        "int8",
        "train",
        _hostile(meta={"privacy-feature-noise": 0.5}),
        "defences: feature-noise = 0.5 needs feature-clip",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_reply_is_rejected_and_the_honest_nodes_go_on(task_identity, case) -> None:
    # Prepare
    dtype, phase, build, reason = CASES[case]
    records: list[dict] = []
    strategy = _strategy(dtype, on_round_end=records.append)
    grid = FakeGrid([*HONEST, HOSTILE])
    for server_round in (1, 2):
        # Execute: the hostile node replies after the honest ones in both phases
        messages = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(server_round, None, ConfigRecord(), grid)
        }
        hostile_train = build(server_round, dtype, True) if phase == "train" else None
        if hostile_train is None:
            hostile_train = _hostile()(server_round, dtype, True)
        strategy.aggregate_train(server_round, [*_honest(server_round, dtype), hostile_train])
        strategy.configure_evaluate(server_round, None, ConfigRecord(), grid)
        hostile_eval = build(server_round, dtype, False) if phase == "evaluate" else None
        if hostile_eval is None:
            hostile_eval = _hostile()(server_round, dtype, False)
        strategy.aggregate_evaluate(
            server_round, [*_honest(server_round, dtype, training=False), hostile_eval]
        )
        # Assert: in round 2 every honest node got its own finite server logits
        if server_round == 2:
            for node, ids in HONEST.items():
                sent = record_arrays(messages[node].content.array_records[LOGITS_KEY])
                assert sorted(sent["ids"].tolist()) == ids.tolist()
                assert np.isfinite(sent["logits"]).all()
    # Assert: both rounds finished, the honest nodes trained and were scored
    assert [r["round"] for r in records] == [1, 2]
    honest_test = sum(len(ids) for ids in HONEST.values())
    for record in records:
        rejected = [r for r in record["rejected_replies"] if r["node_id"] == HOSTILE]
        assert len(rejected) == 1, record["rejected_replies"]
        assert re.search(reason, rejected[0]["reason"]), rejected[0]["reason"]
        assert len(record["rejected_replies"]) == 1
        assert record["train_nodes"] == (3 if phase == "train" else 4)
        assert record["eval_samples"] == honest_test + (len(HOSTILE_IDS) if phase == "train" else 0)
        assert np.isfinite(record["accuracy"]) and np.isfinite(record["server_train_loss"])
        assert 0.0 <= record["edge_accuracy"] <= 1.0
    assert _finite_model(strategy)
    if phase == "train":
        assert str(HOSTILE) not in strategy.store


def test_a_copy_of_another_nodes_payload_is_rejected(task_identity) -> None:
    # Prepare: sample ids local to each node, so only the copy itself can tell
    strategy = _strategy(global_sample_ids=False, sample_ids=None)
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2, HOSTILE]))
    original = _arrays(HONEST[1], "int8", 1)
    replies = [
        _reply(1, 1, original, "int8"),
        _reply(2, 1, _arrays(HONEST[2], "int8", 2), "int8"),
        _reply(HOSTILE, 1, dict(original), "int8"),  # byte for byte, its own key
    ]
    # Execute
    _, metrics = strategy.aggregate_train(1, replies)
    # Assert
    rejected = strategy.engine.current.rejected_replies
    assert [r["node_id"] for r in rejected] == [HOSTILE]
    assert "copy of node key '1'" in rejected[0]["reason"]
    assert strategy.store.nodes() == ["1", "2"]
    assert metrics["num-examples"] == len(HONEST[1]) + len(HONEST[2])


def test_a_key_moves_to_a_new_node_id_once_its_node_is_gone(task_identity) -> None:
    # Prepare: round 1 with nodes 1, 2, 3
    strategy = _strategy()
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid(HONEST))
    strategy.aggregate_train(1, _honest(1, "int8"))
    stored = strategy.store.num_samples
    # Execute: node 1 restarts as node 11 (node 1 is gone) and sends key "1"
    strategy.configure_train(2, None, ConfigRecord(), FakeGrid([2, 3, 11]))
    restarted = _reply(11, 2, _arrays(HONEST[1], "int8", 5), "int8", key="1")
    others = [m for m in _honest(2, "int8") if m.metadata.src_node_id != 1]
    strategy.aggregate_train(2, [restarted, *others])
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(3, None, ConfigRecord(), FakeGrid([2, 3, 11]))
    }
    # Assert: one entry for key "1", not two; node 11 gets key "1"'s logits
    assert strategy.engine.current.rejected_replies == []
    assert strategy.store.nodes() == ["1", "2", "3"]
    assert strategy.store.num_samples == stored
    sent = record_arrays(messages[11].content.array_records[LOGITS_KEY])
    assert sorted(sent["ids"].tolist()) == HONEST[1].tolist()
    assert strategy.engine.registry.node_of("1") == 11


def test_a_node_cannot_speak_for_two_keys(task_identity) -> None:
    strategy = _strategy()
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1, 2]))
    strategy.aggregate_train(
        1,
        [
            _reply(1, 1, _arrays(HONEST[1], "int8", 1), "int8"),
            _reply(1, 1, _arrays(HONEST[2], "int8", 2), "int8", key="other"),
        ],
    )
    rejected = strategy.engine.current.rejected_replies
    assert len(rejected) == 1 and "already speaks for node key '1'" in rejected[0]["reason"]
    assert strategy.store.nodes() == ["1"]


def test_extra_records_arrays_and_metrics_are_ignored(task_identity) -> None:
    strategy = _strategy()
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([1]))
    reply = _reply(1, 1, {**_arrays(HONEST[1], "int8", 1), "junk": np.zeros(3)}, "int8")
    reply.content["extra"] = ArrayRecord({"blob": arrays_record({"x": np.ones(2)})["x"]})
    reply.content.metric_records[METRICS_KEY]["unknown"] = [1.0, 2.0]
    _, metrics = strategy.aggregate_train(1, [reply])
    assert strategy.engine.current.rejected_replies == []
    assert metrics["replies"] == 1 and strategy.store.nodes() == ["1"]


# -- defence in depth: what validation lets through must still not poison the model ---
def test_a_node_whose_features_make_training_non_finite_is_taken_out(task_identity) -> None:
    # Prepare: no feature bound and no federation range, so features of 3e38
    # reach the server's training
    strategy = _strategy("float32", max_feature_abs=float("inf"))
    strategy.engine.range.factor = float("inf")
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid([*HONEST, HOSTILE]))
    poison = _hostile(lambda a: _with(a, features=np.full_like(a["features"], 3e38)))
    before = [t.clone() for t in strategy.trainer.model.parameters()]
    # Execute
    _, metrics = strategy.aggregate_train(1, [*_honest(1, "float32"), poison(1, "float32", True)])
    rejected = list(strategy.engine.current.rejected_replies)
    skipped = strategy.engine.current.skipped_server_steps
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(2, None, ConfigRecord(), FakeGrid([*HONEST, HOSTILE]))
    }
    # Assert: the poisoned steps were skipped, the node rejected, the rest trained
    assert [r["node_id"] for r in rejected] == [HOSTILE] and skipped >= 1
    assert "non-finite loss or gradient" in rejected[0]["reason"]
    assert _finite_model(strategy)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before, strategy.trainer.model.parameters(), strict=True)
    )
    assert np.isfinite(metrics["server-train-loss"]) and metrics["replies"] == 3
    assert str(HOSTILE) not in strategy.store and LOGITS_KEY not in messages[HOSTILE].content
    for node in HONEST:
        sent = record_arrays(messages[node].content.array_records[LOGITS_KEY])
        assert np.isfinite(sent["logits"]).all()


def test_a_node_whose_test_features_give_non_finite_logits_is_not_scored(task_identity) -> None:
    # Prepare
    records: list[dict] = []
    strategy = _strategy("float32", max_feature_abs=float("inf"), on_round_end=records.append)
    strategy.engine.range.factor = float("inf")  # the scoring itself must hold
    strategy.configure_train(1, None, ConfigRecord(), FakeGrid(HONEST))
    strategy.aggregate_train(1, _honest(1, "float32"))
    strategy.configure_evaluate(1, None, ConfigRecord(), FakeGrid([*HONEST, HOSTILE]))
    poison = _hostile(lambda a: _with(a, features=np.full_like(a["features"], 3e38)))
    # Execute
    strategy.aggregate_evaluate(1, [*_honest(1, "float32", False), poison(1, "float32", False)])
    # Assert
    record = records[-1]
    assert [r["node_id"] for r in record["rejected_replies"]] == [HOSTILE]
    assert "not finite" in record["rejected_replies"][0]["reason"]
    assert record["eval_nodes"] == 3
    assert record["eval_samples"] == sum(len(ids) for ids in HONEST.values())
    assert np.isfinite(record["accuracy"])


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_the_server_never_takes_a_non_finite_step(precision) -> None:
    # Prepare: a store with an honest node and one whose features overflow
    store = FeatureStore()
    gen = torch.Generator().manual_seed(0)
    for key, value in (("honest", None), ("poison", 3e38)):
        n = 12
        feats = torch.relu(torch.randn(n, *SHAPE, generator=gen))
        if value is not None:
            feats = torch.full_like(feats, value)
        store.put(
            key,
            FeaturePayload(
                EncodedFeatures("float32", feats.numpy()),
                torch.randn(n, CLASSES, generator=gen).numpy(),
                np.arange(n, dtype=np.int64) % CLASSES,
                np.arange(n, dtype=np.int64) + (0 if value is None else 100),
            ),
            server_round=1,
        )
    trainer = ServerTrainer(CLASSES, batch_size=8, seed=0, device="cpu", precision=precision)
    if precision == "float16":  # a loss scale that honest gradients do not overflow
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # Execute
    result = trainer.train(store, epochs=2)
    # Assert
    assert list(result.excluded) == ["poison"] and result.skipped_steps >= 1
    assert "non-finite" in result.excluded["poison"]
    after = trainer.model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in after.values())  # BN stats included
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the honest node trained
    assert np.isfinite(result.loss)
    if precision == "float32":
        assert result.samples == 12  # every honest sample of the last epoch trained
    else:  # float16 may skip an honest step whose scaled gradients overflow (CPU-dependent)
        assert 0 < result.samples <= 12


# -- how a run ends ------------------------------------------------------------------
def test_results_json_says_how_the_run_ended(tmp_path) -> None:
    writer = ResultsWriter(tmp_path, {"algorithm": "fedgkt"})
    assert json.loads(writer.path.read_text())["status"] == "running"
    writer({"round": 1})
    writer.finish("failed", "RuntimeError: boom")
    written = json.loads(writer.path.read_text())
    assert written["status"] == "failed" and written["error"] == "RuntimeError: boom"
    assert written["rounds"] == [{"round": 1}]


class _FailingGrid(InProcessGrid):
    """Delivers messages until the ``fail_at``-th exchange, then raises."""

    def __init__(self, contexts: dict[int, Context], fail_at: int) -> None:
        super().__init__(contexts)
        self.calls = 0
        self.fail_at = fail_at

    def send_and_receive(self, messages, timeout=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the link to the SuperLink broke")
        return super().send_and_receive(messages, timeout)


def test_a_server_app_that_fails_leaves_status_failed(task_identity, tmp_path) -> None:
    from flwr_fedgkt import server_app

    # Prepare: the built-in ServerApp's main, whose grid breaks in round 2
    out = tmp_path / "out"
    run_config = {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 64,
        "num-server-rounds": 3,
        "batch-size": 16,
        "seed": 3,
        "device": "cpu",
        "output-dir": str(out),
    }
    contexts = {10 + i: node_context(10 + i, i, 2, run_config) for i in range(2)}
    grid = _FailingGrid(contexts, fail_at=4)  # 1: key query, 2-3: round 1, 4: round 2
    context = server_context(run_config)
    # Execute
    with pytest.raises(RuntimeError, match="link to the SuperLink broke"):
        server_app.main(grid, context)
    # Assert: round 1 is kept, and the file says the run failed and why
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "failed"
    assert "the link to the SuperLink broke" in written["error"]
    assert [r["round"] for r in written["rounds"]] == [1]


def test_a_run_that_cannot_resume_leaves_status_failed(task_identity, tmp_path) -> None:
    from flwr_fedgkt import server_app

    # Prepare: resume-from names a folder without any checkpoint
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    run_config = {
        "dataset": "synthetic",
        "device": "cpu",
        "output-dir": str(out),
        "resume-from": str(empty),
    }
    contexts = {10 + i: node_context(10 + i, i, 2, run_config) for i in range(2)}
    context = server_context(run_config)
    # Execute
    server_app.main(InProcessGrid(contexts), context)
    # Assert
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "failed" and "checkpoint" in written["error"]
    assert written["rounds"] == []


def test_the_bounds_come_from_the_run_config_to_both_faces() -> None:
    from flwr_fedgkt.legacy import LegacyFedGKT
    from flwr_fedgkt.settings import RunConfig

    config = RunConfig.from_mapping({"max-feature-abs": 5.0, "max-reply-bytes": 1234})
    for face in (FedGKT, LegacyFedGKT):
        engine = face.from_run_config(config, CLASSES).engine
        assert (engine.max_feature_abs, engine.max_reply_bytes) == (5.0, 1234)


def test_made_up_samples_weigh_no_more_than_the_nodes_first_upload(task_identity) -> None:
    # Prepare: ids local to each node (no partition map); the hostile node's first
    # evaluation upload has 8 samples, its second 16 made-up ones (all-zero
    # features, label 0; more than twice its first upload is refused uninflated)
    records: list[dict] = []
    strategy = _strategy(global_sample_ids=False, sample_ids=None, on_round_end=records.append)
    grid = FakeGrid([*HONEST, HOSTILE])
    junk_ids = np.arange(5000, 5016, dtype=np.int64)
    junk = encode_features(torch.zeros(16, *SHAPE), "int8").arrays()
    junk.update(labels=np.zeros(16, dtype=np.int64), ids=junk_ids)
    for server_round in (1, 2):
        strategy.configure_train(server_round, None, ConfigRecord(), grid)
        strategy.aggregate_train(server_round, _honest(server_round, "int8"))
        strategy.configure_evaluate(server_round, None, ConfigRecord(), grid)
        hostile = (
            _hostile()(server_round, "int8", False)
            if server_round == 1
            else _reply(HOSTILE, 2, junk, "int8", training=False)
        )
        # Execute
        strategy.aggregate_evaluate(server_round, [*_honest(server_round, "int8", False), hostile])
    # Assert: the headline weighs each honest node by its samples and the hostile
    # node by 8 (its first upload), not 16; the median and per-node figures are kept
    record = records[-1]
    node_accuracy = record["node_accuracy"]
    assert sorted(node_accuracy) == ["1", "2", "3", "9"]
    weights = {str(k): len(v) for k, v in HONEST.items()} | {"9": len(HOSTILE_IDS)}
    expected = sum(node_accuracy[k] * w for k, w in weights.items()) / sum(weights.values())
    assert record["accuracy"] == pytest.approx(expected)
    assert record["accuracy_median"] == pytest.approx(np.median(list(node_accuracy.values())))
    honest = sum(node_accuracy[k] * weights[k] for k in ("1", "2", "3")) / 38
    assert abs(record["accuracy"] - honest) <= len(HOSTILE_IDS) / (38 + len(HOSTILE_IDS))
    assert record["eval_samples"] == 38 + 16
