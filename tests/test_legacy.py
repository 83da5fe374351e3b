"""The legacy API as a drop-in: FedAvg's argument names on LegacyFedGKT, the
node's own edge model and data on FedGKTNumPyClient, the deprecated compat alias."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import SimpleClientManager
from inprocess import node_context
from test_compat import Proxy
from torch import nn
from torch.utils.data import TensorDataset

import flwr_fedgkt.legacy as legacy
from flwr_fedgkt.legacy import EVALUATE_ARRAY_PREFIX, FedGKTNumPyClient, LegacyFedGKT
from flwr_fedgkt.legacy.server_app import server_fn
from flwr_fedgkt.server import ServerTrainer

CLASSES = 3
FEATURES = (4, 8, 8)  # the tiny edge model's features of a 1 x 8 x 8 input
# the run config of the one node (node 7, partition 0 of 1) the client tests use
RUN_CONFIG = {"batch-size": 4, "client-epochs": 1, "seed": 1, "device": "cpu"}


class TinyEdge(nn.Module):
    """A 1-conv extractor and a linear head: 1 x 8 x 8 -> (3 logits, 4 x 8 x 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(x)
        return self.head(features), features


def _trainer() -> ServerTrainer:
    server = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES))
    return ServerTrainer(model=server, feature_shape=FEATURES, batch_size=8, device="cpu")


def _strategy(**kwargs) -> LegacyFedGKT:
    return LegacyFedGKT(_trainer(), feature_dtype="float32", **kwargs)


def _manager(node_ids: list[int]) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node_id in node_ids:
        manager.register(Proxy(node_id))
    return manager


# -- FedAvg's argument names -----------------------------------------------------------
def _round_config(server_round: int) -> dict:
    return {"client-epochs": 2, "note": f"round {server_round}"}


@pytest.mark.parametrize(
    ("fedavg_name", "attribute", "value"),
    [
        ("fraction_fit", "fraction_train", 0.5),
        ("fraction_evaluate", "fraction_evaluate", 0.25),
        ("min_fit_clients", "min_train_nodes", 3),
        ("min_evaluate_clients", "min_evaluate_nodes", 4),
        ("min_available_clients", "min_available_nodes", 5),
        ("on_fit_config_fn", "on_fit_config_fn", _round_config),
        ("on_evaluate_config_fn", "on_evaluate_config_fn", _round_config),
    ],
)
def test_a_fedavg_argument_lands_on_its_fedgkt_attribute(fedavg_name, attribute, value) -> None:
    # Execute
    strategy = _strategy(**{fedavg_name: value})
    # Assert
    assert getattr(strategy, attribute) == value


@pytest.mark.parametrize(
    ("fedavg_name", "why"),
    [
        ("initial_parameters", "FedGKT averages no weights; the server model is the Server"),
        ("inplace", "FedGKT averages no weights"),
        ("accept_failures", "always recorded (failed_nodes"),
        ("fit_metrics_aggregation_fn", "on_round_end"),
        ("evaluate_metrics_aggregation_fn", "on_round_end"),
    ],
)
def test_a_fedavg_argument_without_meaning_in_fedgkt_says_why(fedavg_name, why) -> None:
    # Execute / Assert
    with pytest.raises(TypeError) as raised:
        _strategy(**{fedavg_name: None})
    message = str(raised.value)
    assert message.startswith(f"LegacyFedGKT: {fedavg_name!r} has no meaning here: ")
    assert why in message


def test_evaluate_fn_scores_the_server_model_as_fedavg_scores_its_global_model() -> None:
    # Prepare: an evaluate_fn that keeps what it is given
    seen: list[tuple[int, list, dict]] = []

    def evaluate_fn(server_round, arrays, config):
        seen.append((server_round, arrays, config))
        return 0.25, {"accuracy": 0.75}

    strategy = _strategy(evaluate_fn=evaluate_fn)
    state = strategy.trainer.model.state_dict()
    # Execute: round 0 (before any training), as Flower's legacy Server calls it
    result = strategy.evaluate(0, Parameters(tensors=[], tensor_type=""))
    # Assert: its result is the strategy's; the arrays are the server model's
    # state_dict values, in order (never empty)
    assert result == (0.25, {"accuracy": 0.75})
    ((server_round, arrays, config),) = seen
    assert server_round == 0 and config == {} and len(arrays) == len(state) > 0
    for (name, tensor), array in zip(state.items(), arrays, strict=True):
        assert np.array_equal(array, tensor.numpy()), name
    assert _strategy().evaluate(0, Parameters(tensors=[], tensor_type="")) is None


def test_every_fedavg_argument_is_taken_or_refused_with_a_reason() -> None:
    # Prepare
    from flwr_fedgkt.legacy.fedavg_names import (
        FEDAVG_NAMES,
        NO_MEANING,
        SAME_NAMES,
        fedavg_arguments,
    )

    # Execute
    classified = set(FEDAVG_NAMES) | set(NO_MEANING) | set(SAME_NAMES)
    # Assert: the installed Flower's FedAvg has no argument left unexplained
    assert fedavg_arguments() == classified


@pytest.mark.parametrize(
    ("args", "kwargs", "names"),
    [
        ((), {"fraction_train": 0.5, "fraction_fit": 0.5}, ("fraction_train", "fraction_fit")),
        ((0.5,), {"fraction_fit": 0.5}, ("fraction_train", "fraction_fit")),
        ((), {"min_train_nodes": 1, "min_fit_clients": 1}, ("min_train_nodes", "min_fit_clients")),
        (
            (),
            {"min_available_nodes": 1, "min_available_clients": 1},
            ("min_available_nodes", "min_available_clients"),
        ),
    ],
)
def test_both_spellings_of_one_option_is_an_error(args, kwargs, names) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match=f"LegacyFedGKT: got {names[0]!r} and {names[1]!r}"):
        LegacyFedGKT(_trainer(), *args, feature_dtype="float32", **kwargs)


def test_an_unknown_argument_is_an_error_naming_the_strategy_and_the_argument() -> None:
    # Execute / Assert: not an error of an internal class
    with pytest.raises(TypeError) as raised:
        _strategy(fraction_fitt=0.5)
    assert str(raised.value).startswith(
        "LegacyFedGKT got an unexpected keyword argument 'fraction_fitt'"
    )
    assert "did you mean 'fraction_fit'?" in str(raised.value)


def test_a_fedavg_server_fn_keeps_its_arguments(task_identity) -> None:
    # Prepare: FedAvg(fraction_fit=..., min_fit_clients=..., min_available_clients=...)
    strategy = _strategy(
        fraction_fit=0.5, min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1
    )
    # Execute
    sampled = strategy.configure_fit(1, None, _manager([11, 12, 13, 14]))
    # Assert
    assert len(sampled) == 2
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes) == (1, 1)
    assert strategy.min_available_nodes == 1


def test_the_config_functions_add_their_entries_to_each_rounds_config(task_identity) -> None:
    # Prepare: the user's entries, one of them clashing with FedGKT's own
    def fit_config(server_round: int) -> dict:
        return {"client-epochs": server_round + 1, "feature-dtype": "int8"}

    strategy = _strategy(
        on_fit_config_fn=fit_config,
        on_evaluate_config_fn=lambda server_round: {"split": "test"},
        min_available_nodes=1,
    )
    manager = _manager([1, 2])
    # Execute
    fit = strategy.configure_fit(3, None, manager)
    evaluate = strategy.configure_evaluate(3, None, manager)
    # Assert: the user's entries go out; FedGKT's own win a clash
    assert len(fit) == len(evaluate) == 2
    for _, ins in fit:
        assert ins.config["client-epochs"] == 4
        assert ins.config["feature-dtype"] == "float32" and ins.config["server-round"] == 3
    for _, ins in evaluate:
        assert ins.config["split"] == "test" and ins.config["server-round"] == 3
        assert "client-epochs" not in ins.config


# -- the node's own edge model and data ------------------------------------------------
def _items(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


@pytest.mark.parametrize("edge_model", [TinyEdge, TinyEdge()], ids=["factory", "module"])
def test_fit_and_evaluate_run_the_nodes_own_edge_model(edge_model, task_identity) -> None:
    # Prepare: a Dataset of (x, y) items (ids: their index) and a list of (x, y, id)
    # items; no num_classes, the partition id from the node config
    train = TensorDataset(*_items(20, 0))
    test_x, test_y = _items(6, 1)
    test = [(x, int(y), 100 + i) for i, (x, y) in enumerate(zip(test_x, test_y, strict=True))]
    ctx = node_context(7, 0, 1, RUN_CONFIG)
    client = FedGKTNumPyClient(ctx, train, test, edge_model=edge_model)
    first, _, _ = client.fit([], {"server-round": 1, "feature-dtype": "float32"})
    ids, logits = first[3], np.ones((20, CLASSES), dtype=np.float32)
    # Execute
    arrays, num_examples, metrics = FedGKTNumPyClient(ctx, train, test, edge_model=edge_model).fit(
        [ids, logits], {"server-round": 2, "feature-dtype": "float32"}
    )
    loss, num_tested, scores = client.evaluate([], {"server-round": 2, "feature-dtype": "float32"})
    # Assert: features of the tiny model's shape, for every sample, by id
    features, edge_logits, labels, sample_ids = arrays
    assert features.shape == (20, *FEATURES) and edge_logits.shape == (20, CLASSES)
    assert sorted(sample_ids.tolist()) == list(range(20)) and num_examples == 20
    assert metrics["server-round"] == 2 and metrics["node-key"] == "0"
    assert bytes_to_ndarray(scores[EVALUATE_ARRAY_PREFIX + "features"]).shape == (6, *FEATURES)
    assert sorted(bytes_to_ndarray(scores[EVALUATE_ARRAY_PREFIX + "ids"])) == list(range(100, 106))
    assert num_tested == 6 and np.isfinite(loss) and 0.0 <= scores["edge-accuracy"] <= 1.0
    assert not np.array_equal(features, first[0])  # round 2 trained on from round 1


def test_the_server_accepts_the_replies_of_a_nodes_own_edge_model(task_identity) -> None:
    # Prepare
    data = TensorDataset(*_items(12, 2))
    client = FedGKTNumPyClient(node_context(7, 0, 1, RUN_CONFIG), data, data, edge_model=TinyEdge)
    arrays, num_examples, metrics = client.fit([], {"server-round": 1, "feature-dtype": "float32"})
    server = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, CLASSES))  # a bare model
    strategy = LegacyFedGKT(
        server,
        feature_shape=FEATURES,
        feature_dtype="float32",
        min_available_clients=1,
        min_fit_clients=1,
    )
    strategy.configure_fit(1, None, _manager([7]))
    res = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(arrays), num_examples, metrics)
    # Execute
    _, aggregated = strategy.aggregate_fit(1, [(Proxy(7), res)], [])
    # Assert
    assert aggregated["replies"] == 1 and "0" in strategy.store
    assert strategy.engine.current.rejected_replies == []


def test_a_loader_of_batches_and_a_list_of_items_are_told_apart() -> None:
    # Prepare
    x, y = _items(10, 3)
    ids = torch.arange(50, 60)
    batches = [(x[i : i + 4], y[i : i + 4], ids[i : i + 4]) for i in range(0, 10, 4)]
    items = [(x[i], int(y[i])) for i in range(10)]
    # Execute
    from_batches = FedGKTNumPyClient(
        node_context(7, 0, 1, RUN_CONFIG), batches, batches, edge_model=TinyEdge
    )
    from_items = FedGKTNumPyClient(
        node_context(7, 0, 1, RUN_CONFIG), items, items, edge_model=TinyEdge
    )
    # Assert
    assert torch.equal(from_batches.train_set.ids, ids)
    assert from_items.train_set is items
    with pytest.raises(ValueError, match="num_classes"):
        FedGKTNumPyClient(node_context(7, 0, 1, RUN_CONFIG), items, items)


# -- the deprecated module -------------------------------------------------------------
def test_importing_compat_warns_and_gives_the_same_objects(monkeypatch) -> None:
    # Prepare: import it afresh, as a user's first import does
    monkeypatch.delitem(sys.modules, "flwr_fedgkt.compat", raising=False)
    # Execute
    with pytest.warns(DeprecationWarning, match="flwr_fedgkt.legacy"):
        compat = importlib.import_module("flwr_fedgkt.compat")
    # Assert
    assert "server_fn" in compat.__all__ and "LegacyFedGKT" in compat.__all__
    for name in compat.__all__:
        expected = server_fn if name == "server_fn" else getattr(legacy, name)
        assert getattr(compat, name) is expected, name


def test_the_legacy_package_builds_no_server_app_on_import() -> None:
    # the package (and what it imports) leaves the Message-API ServerApp unloaded
    code = (
        "import sys, flwr_fedgkt.legacy; "
        "assert 'flwr_fedgkt.server_app' not in sys.modules, 'server_app imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_legacy_example_imports_the_legacy_package() -> None:
    # Prepare
    from flower_processes import REPO

    sources = (REPO / "examples" / "legacy-api").rglob("*.py")
    # Execute
    text = "\n".join(path.read_text() for path in sources)
    # Assert
    assert "from flwr_fedgkt.legacy import FedGKTNumPyClient" in text
    assert "flwr_fedgkt.compat" not in text
