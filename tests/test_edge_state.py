"""Each node keeps its own edge model: in its Context between rounds and, with
``client-state-dir``, in its own file, from which a restarted node continues.

Two nodes never share (or continue from) one edge state: not in memory, not on
disk, not through a shared seed.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context
from inprocess import node_context

from flwr_fedgkt.client import ContextStateStore
from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.edge_state import DirectoryStateStore, MemoryStateStore, StateAheadError
from flwr_fedgkt.node import EdgeNode, partition_node
from flwr_fedgkt.settings import RunConfig

NUM_CLASSES = 10

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(state_dir=None) -> RunConfig:
    values = {"dataset": "synthetic", "batch-size": 8, "client-epochs": 1, "seed": 3}
    if state_dir is not None:
        values["client-state-dir"] = str(state_dir)
    return RunConfig.from_mapping({**values, "device": "cpu"})


def _data(partition_id: int, n: int = 16) -> SampleSet:
    """A small training split of 8x8 images (the edge model is fully convolutional)."""
    gen = torch.Generator().manual_seed(100 + partition_id)
    ids = torch.arange(n) + 1000 * partition_id
    return SampleSet(
        torch.randn(n, 3, 8, 8, generator=gen),
        torch.randint(0, NUM_CLASSES, (n,), generator=gen),
        ids,
    )


def _node(context: Context, config: RunConfig, partition_id: int) -> EdgeNode:
    """The built-in node of a partition, its state in ``context`` (and on disk)."""
    return partition_node(config, partition_id, NUM_CLASSES, ContextStateStore(context))


def _weights(context: Context, config: RunConfig, partition_id: int) -> dict[str, torch.Tensor]:
    """The edge weights a node with ``context`` would train from next."""
    return _trainer_weights(_node(context, config, partition_id).trainer())


def _trainer_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _round(context: Context, config: RunConfig, partition_id: int, server_round: int) -> None:
    _node(context, config, partition_id).train(_data(partition_id), server_round, None)


def test_fresh_nodes_start_from_their_own_seeded_edge_models() -> None:
    # Prepare
    config = _config()
    # Execute
    first = _weights(node_context(1, 0, 4, {}), config, 0)
    again = _weights(node_context(7, 0, 4, {}), config, 0)
    other = _weights(node_context(2, 1, 4, {}), config, 1)
    # Assert: reproducible per partition, different between partitions
    assert _same(first, again), "one partition's initial edge model is not reproducible"
    assert not _same(first, other), "partitions 0 and 1 start from the same edge model"


def test_two_nodes_keep_apart_edge_states_in_memory_and_on_disk(tmp_path) -> None:
    # Prepare
    config = _config(tmp_path / "clients")
    node_a, node_b = node_context(11, 0, 4, {}), node_context(22, 1, 4, {})
    # Execute: two rounds on both nodes, interleaved
    for server_round in (1, 2):
        _round(node_a, config, 0, server_round)
        _round(node_b, config, 1, server_round)
    # Assert: the two nodes hold different models ...
    weights_a, weights_b = _weights(node_a, config, 0), _weights(node_b, config, 1)
    assert not _same(weights_a, weights_b), "the two nodes hold the same edge model"
    # ... and a restarted node (empty Context) restores its own from disk
    restored_a = _weights(node_context(33, 0, 4, {}), config, 0)
    restored_b = _weights(node_context(44, 1, 4, {}), config, 1)
    files = sorted(p.name for p in (tmp_path / "clients").iterdir())
    assert files == [
        "edge-0-round-0.pt",  # its fresh model: the state before its first round
        "edge-0-round-1.pt",
        "edge-0-round-2.pt",
        "edge-1-round-0.pt",
        "edge-1-round-1.pt",
        "edge-1-round-2.pt",
    ]
    assert _same(restored_a, weights_a), "restarted node a did not restore its own edge state"
    assert _same(restored_b, weights_b), "restarted node b did not restore its own edge state"
    # a partition that never trained starts afresh, from nobody's state
    fresh = _weights(node_context(55, 2, 4, {}), _config(), 2)
    assert _same(_weights(node_context(55, 2, 4, {}), config, 2), fresh), (
        "a partition without a state file restored another node's edge state"
    )


def test_each_node_continues_from_its_own_state(tmp_path) -> None:
    # Prepare: round 1 on both nodes; a copy of node a's state after it
    config = _config(tmp_path / "clients")
    node_a, node_b = node_context(11, 0, 4, {}), node_context(22, 1, 4, {})
    _round(node_a, config, 0, 1)
    _round(node_b, config, 1, 1)
    reference = node_context(99, 0, 4, {})
    ContextStateStore(reference).save(_node(node_a, config, 0).trainer().state_bytes(), 1)
    # Execute: round 2 on node a after node b, and on the copy (no state dir)
    _round(node_b, config, 1, 2)
    _round(node_a, config, 0, 2)
    _round(reference, _config(), 0, 2)
    # Assert: node a's round 2 continued from its own round-1 state
    assert _same(_weights(node_a, config, 0), _weights(reference, _config(), 0)), (
        "node a's round 2 did not continue from its own round-1 edge state"
    )
    # Execute: node b trains last; then round 3 on node a restarted (its state
    # from disk only) and on node a as it is (its state in memory, nothing saved)
    _round(node_b, config, 1, 3)
    restarted = node_context(33, 0, 4, {})
    _round(restarted, config, 0, 3)
    _round(node_a, _config(), 0, 3)
    # Assert: the restarted node continued from node a's state, not node b's
    after_restart = _weights(restarted, config, 0)
    assert _same(after_restart, _weights(node_a, _config(), 0)), (
        "restarted node a did not continue from its own edge state"
    )
    assert not _same(after_restart, _weights(node_b, config, 1))


def test_a_state_in_the_context_wins_over_the_file(tmp_path) -> None:
    # Prepare: round 1 saved to the context and the file, round 2 to the context only
    config = _config(tmp_path / "clients")
    node_a = node_context(11, 0, 4, {})
    _round(node_a, config, 0, 1)
    state_file = tmp_path / "clients" / "edge-0-round-1.pt"
    round_1 = state_file.read_bytes()
    assert ContextStateStore(node_a).load() == round_1
    _round(node_a, _config(), 0, 2)
    # Execute
    restored = _weights(node_a, config, 0)
    # Assert: the context's round-2 state is restored, not the file's round-1 state
    assert _same(restored, _weights(node_a, _config(), 0))
    assert not _same(restored, _weights(node_context(33, 0, 4, {}), config, 0))
    assert state_file.read_bytes() == round_1, "restoring a state wrote the file"


def test_the_core_node_trains_as_the_flower_node_does() -> None:
    # Prepare
    config = _config()
    store, context = MemoryStateStore(), node_context(11, 1, 4, {})
    # Execute: two rounds through the core with its own store, two through Flower
    for server_round in (1, 2):
        core, _ = partition_node(config, 1, NUM_CLASSES, store).train(
            _data(1), server_round, teacher=None
        )
        flower, _ = _node(context, config, 1).train(_data(1), server_round, None)
        # Assert: the same features and logits, round by round
        assert torch.equal(core.features, flower.features)
        assert torch.equal(core.logits, flower.logits)
    core_weights = _trainer_weights(partition_node(config, 1, NUM_CLASSES, store).trainer())
    assert _same(core_weights, _weights(context, config, 1))


@pytest.mark.parametrize("kind", ["directory", "memory", "context"])
def test_a_store_keeps_the_newest_three_rounds_and_gives_the_one_before_a_round(
    tmp_path, kind
) -> None:
    # Prepare
    store = {
        "directory": lambda: DirectoryStateStore(tmp_path, "node/a"),
        "memory": MemoryStateStore,
        "context": lambda: ContextStateStore(node_context(1, 0, 4, {})),
    }[kind]()
    assert store.load(3) is None  # nothing saved: a fresh model
    # Execute
    for server_round in (1, 2, 3, 4):
        store.save(f"state {server_round}".encode(), server_round)
    # Assert: rounds 2-4 are kept; the state before round r is r - 1's. Pipelined
    # rounds need three: a node trains round t + 1 while the server's newest
    # checkpoint is still t - 1's, so a resumed server asks again for round t.
    assert store.load() == b"state 4"
    assert store.load(5) == b"state 4"
    assert store.load(4) == b"state 3"
    assert store.load(3) == b"state 2"
    with pytest.raises(StateAheadError, match=r"rounds \[2, 3, 4\].*before round 2"):
        store.load(2)
    if kind == "directory":
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 3
        assert all(n.endswith(("round-2.pt", "round-3.pt", "round-4.pt")) for n in names)
        assert all("/" not in n and "node" not in n for n in names)


def test_a_node_asked_again_for_a_round_it_trained_trains_it_from_the_round_before(
    tmp_path,
) -> None:
    # Prepare: rounds 1-3 on a node; its round-3 features
    config = _config(tmp_path / "clients")
    node_a = node_context(11, 0, 4, {})
    for server_round in (1, 2):
        _round(node_a, config, 0, server_round)
    first, _ = _node(node_a, config, 0).train(_data(0), 3, None)
    # Execute: the server resumed from round 2 asks for round 3 again, of the node
    # as it is, and of the node restarted (its state on disk only)
    again, _ = _node(node_a, config, 0).train(_data(0), 3, None)
    restarted, _ = _node(node_context(12, 0, 4, {}), config, 0).train(_data(0), 3, None)
    # Assert: the same round 3, not a fourth step from round 3's state
    assert torch.equal(again.features, first.features)
    assert torch.equal(restarted.features, first.features)
    # ... and evaluation of round 2 uses round 2's state, not round 3's
    round_2 = _node(node_a, config, 0).trainer(before_round=3)
    evaluated, _ = _node(node_a, config, 0).evaluate(_data(0), 2)
    assert torch.equal(evaluated.logits, round_2.extract(_data(0)).logits)


def test_a_node_whose_first_round_is_asked_again_trains_it_from_its_fresh_model(
    tmp_path,
) -> None:
    # Prepare: a node first sampled in round 2 (partial participation)
    config = _config(tmp_path / "clients")
    first, _ = _node(node_context(11, 0, 4, {}), config, 0).train(_data(0), 2, None)
    # Execute: a server resumed from round 1's checkpoint asks it for round 2 again,
    # the node as it is and the node restarted (its states on disk only)
    node_a = node_context(11, 0, 4, {})
    _node(node_a, config, 0).train(_data(0), 2, None)
    again, _ = _node(node_a, config, 0).train(_data(0), 2, None)
    restarted, _ = _node(node_context(12, 0, 4, {}), config, 0).train(_data(0), 2, None)
    # Assert: round 2 again from the fresh model, not an error, not a second step
    assert torch.equal(again.features, first.features)
    assert torch.equal(restarted.features, first.features)
