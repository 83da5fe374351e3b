"""A node proves its key; it does not just name it (flwr_fedgkt.identity); and it
holds the samples of its own partition only.

Through the real strategy and the built-in ClientApp functions (messages delivered
in process): a hostile node that answers the key query and trains under another
node's key, after that node proved it, is refused in every round and never gets
its server logits, also after the whole federation restarts with new node ids and
the hostile node answers first.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType
from inprocess import InProcessGrid, node_context

from flwr_fedgkt import client_app
from flwr_fedgkt.checkpoint import load_latest_checkpoint
from flwr_fedgkt.client import FedGKTClient, key_reply
from flwr_fedgkt.identity import NodeIdentity, identity_file, statement, verify_proof
from flwr_fedgkt.node import edge_model_factory, load_node_partition, partition_sample_ids
from flwr_fedgkt.records import LOGITS_KEY
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

VICTIM_KEY = "1"


def test_a_proof_holds_for_its_own_statement_only() -> None:
    # Prepare
    identity = NodeIdentity.generate()
    proof = identity.prove("train", "3", 17, 2)
    # Execute / Assert: valid for its statement; not for another kind, key, node
    # id or round, nor under another public key
    public, signature = proof["node-public-key"], proof["node-proof"]
    assert verify_proof(public, signature, statement("train", "3", 17, 2))
    for other in (
        statement("evaluate", "3", 17, 2),
        statement("train", "4", 17, 2),
        statement("train", "3", 18, 2),
        statement("train", "3", 17, 3),
    ):
        assert not verify_proof(public, signature, other)
    stranger = NodeIdentity.generate().public_hex
    assert not verify_proof(stranger, signature, statement("train", "3", 17, 2))
    for bad in (None, 3, "zz" * 32, public[:-2]):
        assert not verify_proof(bad, signature, statement("train", "3", 17, 2))


def test_a_node_keeps_its_identity_in_its_state_dir(tmp_path) -> None:
    # Prepare / Execute: a first identity, written to the state dir; then a
    # restarted node (nothing in memory) reads it back
    first = NodeIdentity.kept(None, tmp_path, "node/0")
    again = NodeIdentity.kept(None, tmp_path, "node/0")
    other = NodeIdentity.kept(None, tmp_path, "node/1")
    # Assert
    assert again.public_hex == first.public_hex != other.public_hex
    path = identity_file(tmp_path, "node/0")
    assert path.parent == tmp_path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert NodeIdentity.kept(first.secret, None, "x").public_hex == first.public_hex


def _run_config(state_dir: Path) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic-samples-per-node": 30,
        "batch-size": 16,
        "server-epochs": 1,
        "seed": 3,
        "feature-dtype": "float16",
        "client-state-dir": str(state_dir),
    }


def _strategy(run_config: dict, checkpoint_dir: Path) -> FedGKT:
    config = RunConfig.from_mapping({**run_config, "device": "cpu"})
    trainer = ServerTrainer.from_run_config(config, num_classes=10)
    return FedGKT(
        trainer,
        server_epochs=1,
        feature_dtype=config.feature_dtype,
        checkpoint_dir=checkpoint_dir,
        global_sample_ids=True,
        min_available_nodes=2,
    )


class Impostor:
    """A node that speaks for ``VICTIM_KEY``: it answers the key query with it (with a
    proof made with its own signing key, or none) and trains as partition 1 from
    its own state; it notes whether the server sent it any server logits."""

    def __init__(self, context: Context, prove: bool) -> None:
        self.context = context
        self.prove = prove
        self.got_logits = False

    def query(self, msg: Message, context: Context) -> Message:
        return key_reply(msg, VICTIM_KEY, context if self.prove else None)

    def train(self, msg: Message, context: Context) -> Message:
        self.got_logits |= LOGITS_KEY in msg.content.array_records
        return client_app.train(msg, context)


def _grid(run_config: dict, ids: list[int], impostor_id: int, prove: bool) -> tuple:
    """Honest partitions 0..2 on ``ids``; the impostor (partition 1's data, its own
    state) on ``impostor_id``."""
    contexts = {n: node_context(n, i, 3, run_config) for i, n in enumerate(ids)}
    state_dir = Path(run_config["client-state-dir"]) / "impostor"
    contexts[impostor_id] = node_context(
        impostor_id, 1, 3, {**run_config, "client-state-dir": str(state_dir)}
    )
    impostor = Impostor(contexts[impostor_id], prove)
    handlers = {
        (impostor_id, MessageType.QUERY): impostor.query,
        (impostor_id, MessageType.TRAIN): impostor.train,
    }
    return InProcessGrid(dict(sorted(contexts.items())), handlers=handlers), impostor


def _rejections(history: list[dict]) -> list[tuple[int, int]]:
    return [(r["round"], x["node_id"]) for r in history for x in r["rejected_replies"]]


@pytest.mark.parametrize("prove", [True, False], ids=["own-proof", "no-proof"])
def test_a_node_that_names_another_nodes_key_gets_nothing_before_or_after_a_restart(
    task_identity, tmp_path, prove
) -> None:
    # Prepare: three honest nodes (ids 11-13), the impostor after them (id 14)
    config = _run_config(tmp_path / "state")
    first = _strategy(config, tmp_path / "ckpt")
    grid, impostor = _grid(config, [11, 12, 13], 14, prove)
    # Execute: two rounds
    first.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2)
    # Assert: the victim (node 12) keeps its key, the impostor is refused every round
    assert first.engine.registry.node_of(VICTIM_KEY) == 12
    assert first.engine.registry.key_of(14) is None
    # (its training and its evaluation reply, in both rounds)
    assert _rejections(first.history) == [(1, 14), (1, 14), (2, 14), (2, 14)]
    assert all(r["train_nodes"] == 3 for r in first.history)
    assert not impostor.got_logits

    # Prepare: the whole federation restarts with new node ids; now the impostor
    # (id 20) answers the key query before the victim (ids 21-23)
    resumed = _strategy(config, tmp_path / "ckpt")
    state, _, _ = load_latest_checkpoint(tmp_path / "ckpt")
    resumed.engine.load_state_dict(state)
    grid, impostor = _grid(config, [21, 22, 23], 20, prove)
    # Execute: round 3
    resumed.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1)
    # Assert: the victim's key (and its logits) went to its own node only
    assert resumed.engine.registry.node_of(VICTIM_KEY) == 22
    assert resumed.engine.registry.key_of(20) is None
    assert [x for x in _rejections(resumed.history) if x[0] == 3] == [(3, 20), (3, 20)]
    assert resumed.history[-1]["train_nodes"] == 3
    assert not impostor.got_logits


def test_a_node_cannot_squat_another_nodes_samples(task_identity, tmp_path) -> None:
    # Prepare: four partitions of the built-in synthetic set; the squatter (node 5,
    # key "3", replying first) uploads partition 1's samples under its own key;
    # the server checks ids against the partitions as the built-in app does
    config = _run_config(tmp_path / "state")
    run_config = RunConfig.from_mapping({**config, "device": "cpu"})
    strategy = FedGKT(
        ServerTrainer.from_run_config(run_config, num_classes=10),
        server_epochs=1,
        feature_dtype=run_config.feature_dtype,
        global_sample_ids=True,
        sample_ids=partition_sample_ids(run_config, 4),
    )
    contexts = {10 + i: node_context(10 + i, i, 4, config) for i in range(3)}
    contexts[5] = node_context(5, 3, 4, config)
    victim_data = load_node_partition(1, 4, run_config)
    squatter = FedGKTClient(
        edge_model_factory(run_config, 10, 3),
        victim_data.train,
        victim_data.test,
        node_key="3",
        batch_size=16,
    )
    handlers = {
        (5, MessageType.TRAIN): squatter.train,
        (5, MessageType.EVALUATE): squatter.evaluate,
    }
    grid = InProcessGrid(dict(sorted(contexts.items())), handlers=handlers)
    # Execute
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=2)
    # Assert: the squatter is refused in both phases of both rounds, naming the
    # partition; the three honest nodes train and are scored every round
    rejected = [x for r in strategy.history for x in r["rejected_replies"]]
    assert [x["node_id"] for x in rejected] == [5, 5, 5, 5]
    assert all("are not in node key '3''s partition" in x["reason"] for x in rejected)
    assert all(r["train_nodes"] == 3 and r["eval_nodes"] == 3 for r in strategy.history)
    assert strategy.store.nodes() == ["0", "1", "2"]
