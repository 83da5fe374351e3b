"""The legacy-API faces (NumPyClient, legacy Strategy) against the Message-API ones."""

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    GetPropertiesRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from inprocess import model_hash, node_context, server_context

from flwr_fedgkt.client_app import evaluate, train
from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.data import load_partition
from flwr_fedgkt.legacy import (
    EVALUATE_ARRAY_PREFIX,
    FIT_ARRAYS,
    FedGKTNumPyClient,
    LegacyFedGKT,
    samples_from_loader,
)
from flwr_fedgkt.records import (
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    arrays_record,
    logits_record,
    record_arrays,
)
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.strategy import FedGKT

RUN_CONFIG = {"dataset": "synthetic", "batch-size": 16, "client-epochs": 1, "seed": 3}
SHAPE = (16, 8, 8)


# -- helpers ---------------------------------------------------------------------------
def _numpy_client(ctx: Context) -> FedGKTNumPyClient:
    partition_id = int(ctx.node_config["partition-id"])
    partition = load_partition("synthetic", partition_id, 4, seed=RUN_CONFIG["seed"])
    return FedGKTNumPyClient(
        ctx, partition.train, partition.test, partition.num_classes, partition_id
    )


def _message(node_id: int, server_round: int, kind: str, dtype: str, logits=None) -> Message:
    content = RecordDict(
        {"config": ConfigRecord({"server-round": server_round, "feature-dtype": dtype})}
    )
    if logits is not None:
        content[LOGITS_KEY] = logits_record(*logits)
    return make_message(content, src_node_id=0, dst_node_id=node_id, message_type=kind)


class Proxy(ClientProxy):
    """Identifies a node to the strategy; the tests hand the strategy replies directly."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def _manager(node_ids: list[int]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node_id in node_ids:
        manager.register(Proxy(node_id))
    return manager


def _payload(sample_ids: np.ndarray, seed: int, with_logits: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = len(sample_ids)
    arrays = encode_features(torch.relu(torch.randn(n, *SHAPE, generator=gen)), "float32").arrays()
    arrays.update(
        labels=(sample_ids % 10).astype(np.int64),
        ids=sample_ids.astype(np.int64),
    )
    if with_logits:
        arrays["logits"] = torch.randn(n, 10, generator=gen).numpy()
    return arrays


def _fit_res(arrays: dict, server_round: int, key: str, **overrides) -> FitRes:
    arrays = {**arrays, **overrides}
    return FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([arrays[name] for name in FIT_ARRAYS]),
        num_examples=len(arrays["ids"]),
        metrics={
            "server-round": server_round,
            "feature-dtype": "float32",
            "node-key": key,
            "train_loss": 1.0,
        },
    )


def _evaluate_res(arrays: dict, server_round: int, key: str) -> EvaluateRes:
    metrics = {
        "server-round": server_round,
        "feature-dtype": "float32",
        "node-key": key,
        "edge_accuracy": 0.5,
    }
    for name in ("features", "labels", "ids"):
        metrics[EVALUATE_ARRAY_PREFIX + name] = ndarray_to_bytes(arrays[name])
    return EvaluateRes(
        status=Status(code=Code.OK, message="Success"),
        loss=1.0,
        num_examples=len(arrays["ids"]),
        metrics=metrics,
    )


def _train_reply(node_id: int, arrays: dict, server_round: int) -> Message:
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord({"num-examples": len(arrays["ids"]), "train_loss": 1.0}),
            META_KEY: ConfigRecord(
                {"server-round": server_round, "feature-dtype": "float32", "node-key": str(node_id)}
            ),
        }
    )
    return make_message(content, node_id, 0, MessageType.TRAIN)


def _evaluate_reply(node_id: int, arrays: dict, server_round: int) -> Message:
    content = RecordDict(
        {
            FEATURES_KEY: arrays_record(arrays),
            METRICS_KEY: MetricRecord({"num-examples": len(arrays["ids"]), "edge_accuracy": 0.5}),
            META_KEY: ConfigRecord(
                {"server-round": server_round, "feature-dtype": "float32", "node-key": str(node_id)}
            ),
        }
    )
    return make_message(content, node_id, 0, MessageType.EVALUATE)


def _trainer() -> ServerTrainer:
    return ServerTrainer(10, batch_size=8, seed=0, device="cpu", total_epochs=2)


def _legacy(**kwargs) -> LegacyFedGKT:
    return LegacyFedGKT(_trainer(), feature_dtype="float32", feature_shape=SHAPE, **kwargs)


# -- the client ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_fit_uploads_what_the_message_api_client_uploads_in_the_documented_order(dtype) -> None:
    # Prepare: the same node on both faces; round 2 brings server logits for KD
    message_ctx, legacy_ctx = node_context(5, 1, 4, RUN_CONFIG), node_context(5, 1, 4, RUN_CONFIG)
    client = _numpy_client(legacy_ctx)
    train(_message(5, 1, MessageType.TRAIN, dtype), message_ctx)
    client.fit([], {"server-round": 1, "feature-dtype": dtype})
    ids = client.train_set.ids.numpy()
    teacher = (ids, np.random.default_rng(0).normal(size=(len(ids), 10)).astype(np.float32))
    # Execute
    reply = train(_message(5, 2, MessageType.TRAIN, dtype, logits=teacher), message_ctx)
    arrays, num_examples, metrics = client.fit(
        list(teacher), {"server-round": 2, "feature-dtype": dtype}
    )
    # Assert
    expected = record_arrays(reply.content.array_records[FEATURES_KEY])
    names = FIT_ARRAYS + (("feature_scale", "feature_offset") if dtype == "int8" else ())
    assert len(arrays) == len(names) == len(expected)
    for name, array in zip(names, arrays, strict=True):
        assert array.dtype == expected[name].dtype, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    assert num_examples == len(ids)
    assert metrics["server-round"] == 2 and metrics["feature-dtype"] == dtype
    message_metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["train-loss"] == message_metrics["train-loss"]


def test_evaluate_sends_the_test_features_and_the_edge_scores() -> None:
    # Prepare
    message_ctx, legacy_ctx = node_context(5, 2, 4, RUN_CONFIG), node_context(5, 2, 4, RUN_CONFIG)
    client = _numpy_client(legacy_ctx)
    train(_message(5, 1, MessageType.TRAIN, "float16"), message_ctx)
    client.fit([], {"server-round": 1, "feature-dtype": "float16"})
    # Execute
    reply = evaluate(_message(5, 1, MessageType.EVALUATE, "float16"), message_ctx)
    loss, num_examples, metrics = client.evaluate(
        [], {"server-round": 1, "feature-dtype": "float16"}
    )
    # Assert
    expected = record_arrays(reply.content.array_records[FEATURES_KEY])
    for name in ("features", "labels", "ids"):
        sent = bytes_to_ndarray(metrics[EVALUATE_ARRAY_PREFIX + name])
        np.testing.assert_array_equal(sent, expected[name], err_msg=name)
    message_metrics = reply.content.metric_records[METRICS_KEY]
    assert metrics["edge-accuracy"] == message_metrics["edge-accuracy"]
    assert loss == pytest.approx(message_metrics["edge-loss"])
    assert num_examples == message_metrics["num-examples"]


def test_a_loader_of_batches_with_sample_ids_becomes_the_clients_data() -> None:
    # Prepare
    partition = load_partition("synthetic", 0, 4, seed=3)
    data = partition.train
    loader = [
        (data.images[i : i + 7], data.labels[i : i + 7], data.ids[i : i + 7])
        for i in range(0, len(data), 7)
    ]
    # Execute
    client = FedGKTNumPyClient(node_context(1, 0, 4, RUN_CONFIG), loader, loader, 10, 0)
    # Assert
    assert torch.equal(client.train_set.ids, data.ids)
    assert torch.equal(client.train_set.images, data.images)
    with pytest.raises(ValueError, match="sample_ids"):
        samples_from_loader([(data.images, data.labels)])


def test_edge_state_persists_in_the_context_across_client_instances() -> None:
    # Prepare: client_fn builds a new client for every message; the context stays
    ctx = node_context(9, 3, 4, RUN_CONFIG)
    first, _, _ = _numpy_client(ctx).fit([], {"server-round": 1, "feature-dtype": "float32"})
    # Execute
    second, _, _ = _numpy_client(ctx).fit([], {"server-round": 2, "feature-dtype": "float32"})
    fresh, _, _ = _numpy_client(node_context(9, 3, 4, RUN_CONFIG)).fit(
        [], {"server-round": 2, "feature-dtype": "float32"}
    )
    # Assert: round 2 continued from round 1's edge model, not from a fresh one
    assert not np.array_equal(second[1], fresh[1])
    assert not np.array_equal(second[1], first[1])


# -- the strategy ----------------------------------------------------------------------
def test_each_client_gets_its_own_fit_instructions_with_its_own_logits(task_identity) -> None:
    # Prepare: round 1 with two clients
    strategy = _legacy()
    manager = _manager([202, 101])
    first = strategy.configure_fit(1, Parameters([], "numpy.ndarray"), manager)
    assert [p.node_id for p, _ in first] == [101, 202]
    assert all(ins.parameters.tensors == [] for _, ins in first)
    replies = [
        (Proxy(101), _fit_res(_payload(np.arange(0, 12), 0), 1, "101")),
        (Proxy(202), _fit_res(_payload(np.arange(50, 70), 1), 1, "202")),
    ]
    strategy.aggregate_fit(1, replies, [])
    # Execute
    second = dict((p.node_id, ins) for p, ins in strategy.configure_fit(2, None, manager))
    # Assert
    ids_101, logits_101 = parameters_to_ndarrays(second[101].parameters)
    ids_202, _ = parameters_to_ndarrays(second[202].parameters)
    assert sorted(ids_101.tolist()) == list(range(0, 12))
    assert sorted(ids_202.tolist()) == list(range(50, 70))
    assert logits_101.shape == (12, 10) and logits_101.dtype == np.float32
    # the legacy face holds no digest to name: its client always sends its features
    assert second[101].config == {
        "server-round": 2,
        "feature-dtype": "float32",
        "feature-shape": "16x8x8",
        "compression": "none",
        "freeze-extractor": False,
        "held-features": "",
    }
    assert second[101] is not second[202]
    assert strategy.engine.current.bytes_down > 0


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"features": np.full((4, *SHAPE), np.nan, dtype=np.float32)}, "NaN"),
        ({"labels": np.array([0, 1, 2, 99])}, "labels out of range"),
        ({"ids": np.array([1, 1, 2, 3])}, "duplicate sample ids"),
        ({"round": 1}, "round 1"),
        ({"arrays": 3}, "expected 4 arrays"),
        ({"corrupt": True}, "undecodable"),
    ],
)
def test_a_malformed_reply_touches_neither_store_nor_model(
    task_identity, overrides, reason
) -> None:
    # Prepare
    strategy = _legacy(min_available_nodes=1, min_train_nodes=1)
    strategy.configure_fit(2, Parameters([], "numpy.ndarray"), _manager([7]))
    before = model_hash(strategy.trainer.model)
    server_round = overrides.pop("round", 2)
    num_arrays = overrides.pop("arrays", 4)
    corrupt = overrides.pop("corrupt", False)
    res = _fit_res(_payload(np.arange(4), 0), server_round, "7", **overrides)
    res.parameters.tensors = res.parameters.tensors[:num_arrays]
    if corrupt:
        res.parameters.tensors[0] = b"not an array"
    good = (Proxy(8), _fit_res(_payload(np.arange(10, 20), 1), 2, "8"))
    # Execute
    _, metrics = strategy.aggregate_fit(2, [(Proxy(7), res), good], [RuntimeError("lost")])
    # Assert: the bad reply is recorded and left out; the good one trains the model
    assert "7" not in strategy.store and "8" in strategy.store
    assert metrics["replies"] == 1
    rejected = strategy.engine.current.rejected_replies
    assert [r["node_id"] for r in rejected] == [7] and reason in rejected[0]["reason"]
    assert strategy.engine.current.failed_nodes[0]["reason"] == "RuntimeError: lost"
    assert model_hash(strategy.trainer.model) != before
    assert "7" not in strategy.engine.server_logits


def test_both_strategies_train_and_score_alike_on_the_same_replies(task_identity) -> None:
    # Prepare: the same replies, as Messages and as FitRes/EvaluateRes
    message_records, legacy_records = [], []
    message = FedGKT(
        _trainer(),
        feature_dtype="float32",
        feature_shape=SHAPE,
        on_round_end=message_records.append,
    )
    legacy = _legacy(on_round_end=legacy_records.append)
    train_data = {101: _payload(np.arange(0, 24), 0), 202: _payload(np.arange(50, 66), 1)}
    test_data = {
        101: _payload(np.arange(30, 40), 2, with_logits=False),
        202: _payload(np.arange(70, 78), 3, with_logits=False),
    }
    manager = _manager([101, 202])

    # Execute: two rounds on each face
    for server_round in (1, 2):
        message.configure_train(server_round, None, ConfigRecord(), FakeGrid([101, 202]))
        message.aggregate_train(
            server_round, [_train_reply(n, a, server_round) for n, a in train_data.items()]
        )
        message.aggregate_evaluate(
            server_round, [_evaluate_reply(n, a, server_round) for n, a in test_data.items()]
        )
        legacy.configure_fit(server_round, None, manager)
        legacy.aggregate_fit(
            server_round,
            [(Proxy(n), _fit_res(a, server_round, str(n))) for n, a in train_data.items()],
            [],
        )
        loss, metrics = legacy.aggregate_evaluate(
            server_round,
            [(Proxy(n), _evaluate_res(a, server_round, str(n))) for n, a in test_data.items()],
            [],
        )
    # Assert: same server model, same logits, same round records
    assert model_hash(legacy.trainer.model) == model_hash(message.trainer.model)
    for node_id in train_data:
        np.testing.assert_array_equal(
            legacy.engine.server_logits[str(node_id)][1],
            message.engine.server_logits[str(node_id)][1],
        )
    assert len(legacy_records) == len(message_records) == 2
    for ours, theirs in zip(legacy_records, message_records, strict=True):
        assert set(ours) == set(theirs)
        for key in ("round", "accuracy", "loss", "edge_accuracy", "train_nodes", "eval_samples"):
            assert ours[key] == theirs[key], key
        assert ours["bytes_up"] > 0
    assert loss == message_records[-1]["loss"]
    assert metrics["accuracy"] == message_records[-1]["accuracy"]


def test_a_round_without_evaluation_still_closes_its_record(task_identity) -> None:
    # Prepare
    records = []
    strategy = _legacy(fraction_evaluate=0.0, min_evaluate_nodes=0, on_round_end=records.append)
    manager = _manager([1, 2])
    strategy.configure_fit(1, None, manager)
    strategy.aggregate_fit(1, [(Proxy(1), _fit_res(_payload(np.arange(8), 0), 1, "1"))], [])
    # Execute
    instructions = strategy.configure_evaluate(1, None, manager)
    # Assert
    assert instructions == []
    assert [r["round"] for r in records] == [1]
    assert records[0]["accuracy"] is None and records[0]["train_nodes"] == 1


class AnsweringProxy(Proxy):
    """A client that answers the strategy's key query as FedGKTNumPyClient does."""

    def __init__(self, node_id: int, client: FedGKTNumPyClient) -> None:
        super().__init__(node_id)
        self.client = client
        self.asked = 0

    def get_properties(self, ins, timeout, group_id):
        self.asked += 1
        properties = self.client.get_properties(dict(ins.config))
        return GetPropertiesRes(
            status=Status(code=Code.OK, message="Success"), properties=properties
        )


def test_the_legacy_strategy_asks_new_clients_for_their_keys_and_sends_their_logits() -> None:
    # Prepare: a server that holds node key "0"'s server logits (as after resuming
    # from a checkpoint), and two clients under node ids it has never seen
    legacy = _legacy(min_available_nodes=2)
    ids, logits = np.arange(5, dtype=np.int64), np.ones((5, 10), dtype=np.float32)
    legacy.engine.step.server_logits = {"0": (ids, logits)}
    proxies = [AnsweringProxy(901, _numpy_client(node_context(901, 0, 4, RUN_CONFIG)))]
    proxies.append(AnsweringProxy(902, _numpy_client(node_context(902, 1, 4, RUN_CONFIG))))
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    # Execute: two rounds
    first = dict((p.node_id, ins) for p, ins in legacy.configure_fit(3, None, manager))
    legacy.configure_fit(4, None, manager)
    # Assert: each client was asked once; the node with key "0" got its logits
    assert [p.asked for p in proxies] == [1, 1]
    assert legacy.engine.registry.key_of(901) == "0" and legacy.engine.registry.key_of(902) == "1"
    sent = parameters_to_ndarrays(first[901].parameters)
    np.testing.assert_array_equal(sent[0], ids)
    np.testing.assert_array_equal(sent[1], logits)
    assert parameters_to_ndarrays(first[902].parameters) == []


def test_the_legacy_server_app_refuses_to_resume_instead_of_starting_afresh(tmp_path) -> None:
    from flwr_fedgkt.legacy.server_app import server_fn
    from flwr_fedgkt.settings import ConfigError

    run_config = {"resume-from": str(tmp_path), "output-dir": str(tmp_path / "out")}
    context = server_context(run_config)
    with pytest.raises(ConfigError, match="resume-from: the legacy-API ServerApp cannot resume"):
        server_fn(context)
    assert not (tmp_path / "out").exists()  # nothing started
