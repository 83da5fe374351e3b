"""FedGKTClient with a node's own edge model and data: any data set of ``(x, y)``
or ``(x, y, id)`` items, ids from the data set or its indices, KD targets that
follow the id through shuffling and augmentation in ``__getitem__``, the node key
in every reply, and clear errors for what cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_message
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from torch import Tensor, nn

from flwr_fedgkt import FedGKTClient
from flwr_fedgkt.edge_data import training_batches
from flwr_fedgkt.precision import resolve_precision
from flwr_fedgkt.records import FEATURES_KEY, LOGITS_KEY, META_KEY, METRICS_KEY, logits_record
from flwr_fedgkt.records import record_arrays as arrays_of

CLASSES, WIDTH = 3, 6

pytestmark = pytest.mark.usefixtures("one_thread")


class EdgeMLP(nn.Module):
    """A tiny edge model on 4-value inputs: 6 features, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.extractor = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.extractor(x)
        return self.head(features), features


def _items(n: int = 12) -> list[tuple[Tensor, int]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, generator=gen), i % CLASSES) for i in range(n)]


def _context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 7} if node_config is None else node_config,
        state=RecordDict(),
        run_config={},
    )


def _message(server_round: int, dtype: str = "float32", teacher=None, **config) -> object:
    content = RecordDict(
        {"config": ConfigRecord({"server-round": server_round, "feature-dtype": dtype, **config})}
    )
    if teacher is not None:
        content[LOGITS_KEY] = logits_record(*teacher)
    return make_message(content, src_node_id=0, dst_node_id=5, message_type=MessageType.TRAIN)


def test_a_list_of_pairs_uploads_features_of_its_own_shape_with_index_ids() -> None:
    # Prepare
    items = _items()
    client = FedGKTClient(EdgeMLP, items, items[:5], batch_size=4)
    # Execute
    reply = client.train(_message(1), _context())
    # Assert: features are N x 6, ids are the indices, labels the items' labels
    arrays = arrays_of(reply.content.array_records[FEATURES_KEY])
    assert arrays["features"].shape == (12, WIDTH) and arrays["features"].dtype == np.float32
    np.testing.assert_array_equal(arrays["ids"], np.arange(12))
    np.testing.assert_array_equal(arrays["labels"], np.arange(12) % CLASSES)
    assert arrays["logits"].shape == (12, CLASSES)
    meta = reply.content.config_records[META_KEY]
    assert meta["node-key"] == "7" and meta["server-round"] == 1
    # the default (auto, as resolved on this machine); the reply says what it used
    assert meta["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert reply.content.metric_records[METRICS_KEY]["num-examples"] == 12


def test_the_features_are_the_edge_models_features_of_each_sample() -> None:
    # Prepare: the model the client will build, and the items
    items = _items()
    client = FedGKTClient(EdgeMLP, items, items, epochs=0)
    # Execute: a round without training (0 epochs) extracts with the fresh model
    reply = client.train(_message(1), _context())
    # Assert: row i is the model's features of item i
    model = EdgeMLP().eval()
    expected = model.extractor(torch.stack([x for x, _ in items])).detach().numpy()
    arrays = arrays_of(reply.content.array_records[FEATURES_KEY])
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-6)


def test_ids_the_data_set_gives_are_the_ones_uploaded() -> None:
    # Prepare: items that carry their own ids
    items = [(x, y, 1000 - 3 * i) for i, (x, y) in enumerate(_items())]
    client = FedGKTClient(EdgeMLP, items, items)
    # Execute
    reply = client.evaluate(_message(1), _context())
    # Assert
    arrays = arrays_of(reply.content.array_records[FEATURES_KEY])
    np.testing.assert_array_equal(arrays["ids"], 1000 - 3 * np.arange(12))
    assert "logits" not in arrays
    metrics = reply.content.metric_records[METRICS_KEY]
    assert 0.0 <= metrics["edge-accuracy"] <= 1.0 and metrics["num-examples"] == 12


class _Noisy(torch.utils.data.Dataset):
    """Items whose input encodes their id; ``__getitem__`` adds random noise below
    0.25, as a random augmentation would."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        sample_id = self.ids[index]
        x = torch.full((4,), float(sample_id)) + torch.rand(4) * 0.25
        return x, sample_id % CLASSES, sample_id


def test_ids_stay_with_their_samples_through_shuffling_and_augmentation() -> None:
    # Prepare
    data = _Noisy([40, 7, 23, 11, 5, 31, 2, 19])
    # Execute: shuffled batches, as training draws them
    seen = []
    for x, y, ids in training_batches(data, 3, torch.Generator().manual_seed(0)):
        # Assert: each input is its id's, each label its id's
        np.testing.assert_array_equal(x[:, 0].floor().long().numpy(), ids.numpy())
        np.testing.assert_array_equal(y.numpy(), ids.numpy() % CLASSES)
        seen.extend(ids.tolist())
    assert sorted(seen) == sorted(data.ids) and seen != data.ids, "not shuffled"


def test_kd_targets_are_found_by_the_data_sets_ids() -> None:
    # Prepare: server logits for every id of the data set, and for none of them
    data = _Noisy([40, 7, 23, 11, 5, 31, 2, 19])
    ids = np.array(data.ids)
    targets = np.tile(np.array([[9.0, -9.0, 0.0]], dtype=np.float32), (len(ids), 1))
    with_kd = FedGKTClient(EdgeMLP, data, alpha=1.0, batch_size=4)
    # Execute: the same round with targets keyed by the data set's ids, and by others
    found = with_kd.train(_message(1, teacher=(ids, targets)), _context())
    missed = with_kd.train(_message(1, teacher=(ids + 1, targets)), _context())
    # Assert: the KD term is non-zero only when the ids match
    assert found.content.metric_records[METRICS_KEY]["train-kd"] > 0.1
    assert missed.content.metric_records[METRICS_KEY]["train-kd"] == 0.0


def test_a_node_key_given_is_the_key_replies_carry() -> None:
    # Prepare: a node without a partition id
    client = FedGKTClient(EdgeMLP, _items(), node_key="hospital-a")
    # Execute
    reply = client.train(_message(1), _context(node_config={}))
    # Assert
    assert reply.content.config_records[META_KEY]["node-key"] == "hospital-a"


def test_without_a_node_key_or_partition_id_the_error_says_what_to_pass() -> None:
    client = FedGKTClient(EdgeMLP, _items())
    with pytest.raises(ValueError, match="node_key"):
        client.train(_message(1), _context(node_config={}))


def test_items_of_another_form_are_named_when_the_client_is_built() -> None:
    with pytest.raises(ValueError, match=r"train_data: item 0 .*\(x, y\)"):
        FedGKTClient(EdgeMLP, [torch.zeros(4)] * 3)


def test_two_samples_with_one_id_are_refused() -> None:
    items = [(x, y, 1) for x, y in _items(4)]
    client = FedGKTClient(EdgeMLP, items)
    with pytest.raises(ValueError, match="same sample id"):
        client.train(_message(1), _context())


def test_freezing_an_extractor_keeps_its_weights_and_trains_the_head() -> None:
    # Prepare
    context = _context()
    client = FedGKTClient(EdgeMLP, _items(), freeze_extractor=True, lr=0.05, epochs=2)
    before = EdgeMLP()
    # Execute
    client.train(_message(1), context)
    after = client.node(context).trainer().model
    # Assert
    for name, value in before.extractor.state_dict().items():
        assert torch.equal(after.extractor.state_dict()[name], value), name
    assert not torch.equal(after.head.weight, before.head.weight)


def test_a_model_without_an_extractor_cannot_be_frozen() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, CLASSES)

        def forward(self, x):
            return self.fc(x), x

    client = FedGKTClient(Bare, _items(), freeze_extractor=True)
    with pytest.raises(ValueError, match="'extractor' or 'stem'"):
        client.train(_message(1), _context())


def test_an_optimizer_of_the_users_own_takes_the_rounds_learning_rate() -> None:
    # Prepare: SGD without momentum, so that one step is lr * gradient
    context_a, context_b = _context(), _context()
    sgd = lambda params: torch.optim.SGD(params, lr=123.0)  # noqa: E731
    items = _items(4)
    client = FedGKTClient(EdgeMLP, items, optimizer=sgd, batch_size=4, lr=0.1)
    # Execute: one full-batch step at lr 0.1, and at the round's lr 0.2
    client.train(_message(1), context_a)
    client.train(_message(1, **{"client-lr": 0.2}), context_b)
    # Assert: the second step is twice the first (the factory's 123 is not used)
    start = EdgeMLP().head.weight
    step_a = client.node(context_a).trainer().model.head.weight - start
    step_b = client.node(context_b).trainer().model.head.weight - start
    torch.testing.assert_close(step_b, 2 * step_a)


def test_nodes_that_share_a_state_dir_keep_apart_edge_states(tmp_path) -> None:
    # Prepare: two nodes with different data, one client-state-dir
    gen = torch.Generator().manual_seed(2)
    other = [(torch.randn(4, generator=gen) * 3, (i + 1) % CLASSES) for i in range(12)]
    data = {7: _items(), 8: other}
    clients = {
        key: FedGKTClient(EdgeMLP, items, items[:5], batch_size=4, state_dir=str(tmp_path))
        for key, items in data.items()
    }
    trained = {}
    for key, client in clients.items():
        context = _context({"partition-id": key})
        client.train(_message(1), context)
        trained[key] = client.node(context).trainer().model.state_dict()
    # Execute: each node restarted (an empty Context) restores from the directory
    restored = {
        key: client.node(_context({"partition-id": key})).trainer().model.state_dict()
        for key, client in clients.items()
    }
    # Assert: the two models differ, and each node gets back its own
    assert any(not torch.equal(trained[7][k], trained[8][k]) for k in trained[7])
    for key in (7, 8):
        assert all(torch.equal(restored[key][k], trained[key][k]) for k in trained[key])
