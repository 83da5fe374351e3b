"""Node sampling draws from a generator seeded by ``seed``, on both Flower faces."""

from conftest import FakeGrid
from flwr.app import ConfigRecord
from flwr.server.client_manager import SimpleClientManager
from test_compat import Proxy

from flwr_fedgkt.legacy import LegacyFedGKT
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.strategy import FedGKT

NODES = list(range(101, 111))
ROUNDS = 4


def _message_api_samples(seed: int) -> list[list[int]]:
    strategy = FedGKT(
        ServerTrainer(10, batch_size=8, seed=0, device="cpu"),
        fraction_train=0.5,
        min_available_nodes=1,
        min_train_nodes=1,
        seed=seed,
    )
    grid = FakeGrid(reversed(NODES))  # the order Flower lists nodes in does not matter
    return [
        sorted(
            m.metadata.dst_node_id for m in strategy.configure_train(r, None, ConfigRecord(), grid)
        )
        for r in range(1, ROUNDS + 1)
    ]


def _legacy_samples(seed: int) -> list[list[int]]:
    strategy = LegacyFedGKT(
        ServerTrainer(10, batch_size=8, seed=0, device="cpu"),
        fraction_train=0.5,
        min_available_nodes=1,
        min_train_nodes=1,
        seed=seed,
    )
    manager = SimpleClientManager()
    for node_id in NODES:
        manager.register(Proxy(node_id))
    return [
        sorted(proxy.node_id for proxy, _ in strategy.configure_fit(r, None, manager))
        for r in range(1, ROUNDS + 1)
    ]


def test_the_same_seed_samples_the_same_nodes_in_every_round(task_identity) -> None:
    for sample in (_message_api_samples, _legacy_samples):
        # Execute: two runs with one seed, one with another
        first, second, other = sample(5), sample(5), sample(6)
        # Assert
        assert first == second
        assert all(len(nodes) == len(NODES) // 2 for nodes in first)
        assert len({tuple(nodes) for nodes in first}) > 1  # rounds differ from each other
        assert first != other
