import io
import math

import numpy as np
import pytest
import torch
from conftest import FakeGrid, make_message
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from inprocess import node_context

from flwr_fedgkt import FedGKT, ServerTrainer
from flwr_fedgkt.client import STATE_KEY
from flwr_fedgkt.client_app import evaluate, train
from flwr_fedgkt.records import FEATURES_KEY, META_KEY, METRICS_KEY, record_arrays
from flwr_fedgkt.settings import ConfigError

RUN_CONFIG = {"dataset": "synthetic", "batch-size": 16, "client-epochs": 1, "seed": 3}


def _train_message(node_id: int, server_round: int, kind: str = MessageType.TRAIN):
    content = RecordDict(
        {"config": ConfigRecord({"server-round": server_round, "feature-dtype": "float16"})}
    )
    return make_message(content, src_node_id=0, dst_node_id=node_id, message_type=kind)


def _state(ctx: Context) -> bytes:
    """The newest edge state in the node's context."""
    record = ctx.state.array_records[STATE_KEY]
    newest = max(record, key=lambda name: int(name.removeprefix("round-")))
    return record[newest].numpy().tobytes()


def _edge_weights(ctx: Context) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(_state(ctx)), weights_only=True)["model"]


def test_edge_state_persists_across_rounds_on_a_node_and_differs_between_nodes() -> None:
    # Prepare
    node_a, node_b = node_context(11, 0, 4, RUN_CONFIG), node_context(22, 1, 4, RUN_CONFIG)
    # Execute: two rounds on node a, one on node b
    reply_1 = train(_train_message(11, 1), node_a)
    weights_1 = _edge_weights(node_a)
    train(_train_message(11, 2), node_a)
    weights_2 = _edge_weights(node_a)
    train(_train_message(22, 1), node_b)
    weights_b = _edge_weights(node_b)
    # Assert: round 2 continued from round 1's state (it moved on from it, and its
    # optimizer has two rounds of steps), and nodes hold their own models
    assert reply_1.content.array_records[FEATURES_KEY]["features"].numpy().dtype == np.float16
    key = "stem.0.weight"
    assert not torch.equal(weights_1[key], weights_2[key])
    num_train = len(reply_1.content.array_records[FEATURES_KEY]["ids"].numpy())
    steps_per_round = math.ceil(num_train / RUN_CONFIG["batch-size"])
    optimizer_state = torch.load(io.BytesIO(_state(node_a)), weights_only=True)["optimizer"]
    steps = {float(s["step"]) for s in optimizer_state["state"].values()}
    assert steps == {2.0 * steps_per_round}
    assert not torch.equal(weights_2[key], weights_b[key])


def test_train_reply_carries_features_logits_labels_ids_and_metrics() -> None:
    ctx = node_context(5, 2, 4, RUN_CONFIG)
    reply = train(_train_message(5, 1), ctx)
    arrays = record_arrays(reply.content.array_records[FEATURES_KEY])
    n = len(arrays["ids"])
    assert arrays["features"].shape == (n, 16, 32, 32)
    assert arrays["logits"].shape == (n, 10)
    assert arrays["labels"].shape == (n,)
    assert reply.content.metric_records[METRICS_KEY]["num-examples"] == n
    assert reply.content.config_records[META_KEY]["server-round"] == 1


def test_evaluate_sends_test_features_and_the_edge_accuracy() -> None:
    ctx = node_context(5, 2, 4, RUN_CONFIG)
    train(_train_message(5, 1), ctx)
    reply = evaluate(_train_message(5, 1, MessageType.EVALUATE), ctx)
    arrays = record_arrays(reply.content.array_records[FEATURES_KEY])
    metrics = reply.content.metric_records[METRICS_KEY]
    assert "logits" not in arrays
    assert metrics["num-examples"] == len(arrays["labels"]) > 0
    assert 0.0 <= metrics["edge-accuracy"] <= 1.0


def _feature_bytes(dtype: str) -> int:
    """Bytes of the feature arrays in a real train reply's ArrayRecord, as Flower
    counts them (the same node, data and round for every dtype)."""
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "feature-dtype": dtype})})
    msg = make_message(content, src_node_id=0, dst_node_id=9, message_type=MessageType.TRAIN)
    record = train(msg, node_context(9, 1, 4, RUN_CONFIG)).content.array_records[FEATURES_KEY]
    whole = record.count_bytes()
    for key in ("labels", "ids", "logits"):
        del record[key]
    assert record.count_bytes() < whole
    return record.count_bytes()


def test_float16_and_int8_features_are_2x_and_4x_smaller_on_the_wire() -> None:
    sizes = {dtype: _feature_bytes(dtype) for dtype in ("float32", "float16", "int8")}
    # per-channel scale and offset of int8 (2 x 16 float32) and record overhead aside
    assert 1.99 <= sizes["float32"] / sizes["float16"] <= 2.0
    assert 3.98 <= sizes["float32"] / sizes["int8"] <= 4.0


def _round_message(node_id: int, server_round: int, **settings) -> object:
    values = {"server-round": server_round, "feature-dtype": "float16", **settings}
    content = RecordDict({"config": ConfigRecord(values)})
    return make_message(content, src_node_id=0, dst_node_id=node_id, message_type=MessageType.TRAIN)


def test_the_rounds_config_sets_the_edges_training_for_that_round() -> None:
    # Prepare: three nodes of one partition share round 1, then differ in round 2
    contexts = [node_context(11, 0, 4, RUN_CONFIG) for _ in range(3)]
    for ctx in contexts:
        train(_round_message(11, 1), ctx)
    after_round_1 = _edge_weights(contexts[0])
    # Execute: round 2 with the run config's settings, with no epochs, with 10x the lr
    train(_round_message(11, 2), contexts[0])
    train(_round_message(11, 2, **{"client-epochs": 0}), contexts[1])
    train(_round_message(11, 2, **{"client-lr": 0.01}), contexts[2])
    default, no_epochs, fast = (_edge_weights(ctx) for ctx in contexts)
    # Assert: no epochs leaves the model as round 1 left it; a larger rate moves it
    # further than the run config's rate (0.001) does, from the same start
    key = "fc.weight"
    assert torch.equal(no_epochs[key], after_round_1[key])
    assert not torch.equal(default[key], after_round_1[key])
    step_default = (default[key] - after_round_1[key]).norm()
    step_fast = (fast[key] - after_round_1[key]).norm()
    assert step_fast > 3 * step_default
    optimizer = torch.load(io.BytesIO(_state(contexts[2])), weights_only=True)["optimizer"]
    assert optimizer["param_groups"][0]["lr"] == 0.01


def test_a_bad_training_setting_in_the_rounds_config_is_named() -> None:
    with pytest.raises(ConfigError, match="client-lr"):
        train(_round_message(11, 1, **{"client-lr": -1.0}), node_context(11, 0, 4, RUN_CONFIG))


class _NoEdgeEpochsInRound2(FedGKT):
    """A strategy of a user's own that changes one key of round 2's train config
    and hands back to FedGKT (as FedProx injects its proximal term)."""

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 2:
            config = ConfigRecord({**config, "client-epochs": 0})
        return super().configure_train(server_round, arrays, config, grid)


def test_a_strategy_that_changes_round_2s_config_changes_the_edges_round_2(
    task_identity,
) -> None:
    # Prepare: the train config FedGKT's start() would send every round
    strategy = _NoEdgeEpochsInRound2(
        ServerTrainer(10, device="cpu"),
        feature_dtype="float16",
        min_available_nodes=1,
        min_train_nodes=1,
    )
    grid = FakeGrid([11])
    config = ConfigRecord({"client-epochs": 1, "client-lr": 0.001, "batch-size": 16})
    ctx = node_context(11, 0, 4, RUN_CONFIG)
    weights = {}
    # Execute: the strategy's own Messages reach the built-in ClientApp
    for server_round in (1, 2):
        (message,) = strategy.configure_train(server_round, ArrayRecord(), config, grid)
        train(message, ctx)
        weights[server_round] = _edge_weights(ctx)
    # Assert: round 1 trained; round 2 ran the strategy's 0 epochs, not the run
    # config's 1, so the edge model is as round 1 left it
    key = "fc.weight"
    assert message.content.config_records["config"]["client-epochs"] == 0
    assert torch.equal(weights[2][key], weights[1][key])
