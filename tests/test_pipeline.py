"""Pipelined rounds: the server trains round t's features while the nodes evaluate
and train round t+1; every round is scored and recorded once, in order."""

from __future__ import annotations

import threading

import pytest
from flwr.app import ArrayRecord, Message, MessageType
from inprocess import InProcessGrid, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.checkpoint import load_latest_checkpoint
from flwr_fedgkt.pipeline import PipelinedFedGKT
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

RUN_CONFIG = {"dataset": "synthetic", "synthetic-samples-per-node": 40, "batch-size": 16, "seed": 3}


def _strategy(pipeline: bool = False, **kwargs) -> FedGKT:
    config = RunConfig.from_mapping({**RUN_CONFIG, "device": "cpu"})
    trainer = ServerTrainer.from_run_config(config, num_classes=10)
    schedule = PipelinedFedGKT if pipeline else FedGKT
    return schedule(trainer, feature_dtype="int8", seed=3, **kwargs)


def _grid(handlers=None) -> InProcessGrid:
    contexts = {101 + i: node_context(101 + i, i, 2, RUN_CONFIG) for i in range(2)}
    return InProcessGrid(contexts, handlers=handlers)


def test_the_server_trains_while_the_next_round_trains_on_the_nodes(task_identity) -> None:
    # Prepare: round t's server training waits until a node has begun round t+1's
    # edge training; run one after the other, it would wait in vain
    strategy = _strategy(pipeline=True)
    began: dict[int, threading.Event] = {r: threading.Event() for r in range(1, 6)}
    overlapped: list[int] = []
    threads: set[str] = set()
    engine = strategy.engine
    run_training = engine.run_training

    def waiting(job) -> None:
        threads.add(threading.current_thread().name)
        if job.server_round < 3 and began[job.server_round + 1].wait(timeout=30):
            overlapped.append(job.server_round)
        run_training(job)

    engine.run_training = waiting  # type: ignore[method-assign]

    def train(msg: Message, context) -> Message:
        began[int(msg.content.config_records["config"]["server-round"])].set()
        return client_app.train(msg, context)

    grid = _grid({(node, MessageType.TRAIN): train for node in (101, 102)})
    # Execute
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=3)
    # Assert: rounds 1 and 2 trained on the server beside the next round's nodes
    assert overlapped == [1, 2]
    assert threads and all(name.startswith("fedgkt-server") for name in threads)
    history = engine.history
    assert [r["round"] for r in history] == [1, 2, 3]
    assert all(r["accuracy"] is not None and r["train_nodes"] == 2 for r in history)
    # nodes distil from server logits one round older: none yet in round 2
    assert [r["bytes_down"] > 0 for r in history] == [False, False, True]
    # the Result holds every round's metrics and the final server model
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2, 3]
    assert result.evaluate_metrics_clientapp[3]["accuracy"] == history[2]["accuracy"]
    assert (
        result.train_metrics_clientapp[2]["server-train-loss"] == (history[1]["server_train_loss"])
    )
    final = strategy.trainer.model.state_dict()
    assert set(result.arrays) == set(final)


def test_without_pipeline_round_two_already_gets_server_logits(task_identity) -> None:
    strategy = _strategy()
    strategy.start(grid=_grid(), initial_arrays=ArrayRecord(), num_rounds=2)
    assert [r["bytes_down"] > 0 for r in strategy.engine.history] == [False, True]


def test_a_stopped_pipelined_run_resumes_and_records_every_round_once(
    task_identity, tmp_path
) -> None:
    # Prepare / Execute: rounds 1-2, checkpointed; then a new server from the
    # checkpoint, with the same nodes (they keep their state and identity)
    grid = _grid()
    first = _strategy(pipeline=True, checkpoint_dir=tmp_path)
    first.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2)
    state, _, _ = load_latest_checkpoint(tmp_path)
    resumed = _strategy(pipeline=True, checkpoint_dir=tmp_path)
    resumed.engine.load_state_dict(state)
    result = resumed.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2)
    # Assert
    assert int(state["round"]) == 2
    assert [r["round"] for r in resumed.engine.history] == [1, 2, 3, 4]
    assert all(r["accuracy"] is not None for r in resumed.engine.history)
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]  # this start's rounds


def test_a_failing_server_training_stops_the_run_with_its_error(task_identity) -> None:
    strategy = _strategy(pipeline=True)

    def broken(job) -> None:
        raise RuntimeError(f"server training of round {job.server_round} broke")

    strategy.engine.run_training = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="server training of round 1 broke"):
        strategy.start(grid=_grid(), initial_arrays=ArrayRecord(), num_rounds=3)
    assert strategy.engine.history == []


def test_pipeline_refuses_a_central_evaluate_fn() -> None:
    with pytest.raises(ValueError, match="evaluate_fn"):
        _strategy(pipeline=True).start(
            grid=_grid(), initial_arrays=ArrayRecord(), evaluate_fn=lambda r, a: None
        )
