"""One deployable model from a custom app: nodes share one frozen extractor (built
from one seed), the strategy is given that extractor, and the run's model (the
record evaluate_fn receives from round 0 on, Result.arrays) is extractor + server
model, which classifies raw inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from inprocess import HandlerGrid
from torch import nn

from flwr_fedgkt import FedGKT, FedGKTClient
from flwr_fedgkt.models import extractor_and_server, module_digest

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 3
SHAPE = (4, 4, 4)  # the extractor's output on a 1x8x8 image


class Edge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))

    def forward(self, x):
        features = self.extractor(x)
        return self.head(features), features


def seeded_edge(seed: int = 5) -> Edge:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Edge()


def server_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, CLASSES))


def images(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Class c: a bright square in quadrant c (learnable from raw pixels)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        label = i % CLASSES
        x = torch.rand(1, 8, 8, generator=g) * 0.2
        r, c = divmod(label, 2)
        x[0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
        items.append((x, label))
    return items


def client_handlers(edge_seed_of) -> dict:
    def client(context: Context) -> FedGKTClient:
        pid = int(context.node_config["partition-id"])
        data = images(24, seed=pid)
        return FedGKTClient(
            lambda: seeded_edge(edge_seed_of(pid)),
            data,
            data[:9],
            freeze_extractor=True,
            lr=0.01,
            batch_size=8,
            precision="float32",
            device="cpu",
        )

    return {
        "train": lambda msg, ctx: client(ctx).train(msg, ctx),
        "evaluate": lambda msg, ctx: client(ctx).evaluate(msg, ctx),
        "query": lambda msg, ctx: client(ctx).query(msg, ctx),
    }


def strategy(**kwargs) -> FedGKT:
    return FedGKT(
        server_model(),
        feature_shape=SHAPE,
        extractor=seeded_edge().extractor,
        feature_dtype="float32",
        server_epochs=3,
        server_lr=0.01,
        precision="float32",
        device="cpu",
        **kwargs,
    )


def test_evaluate_fn_scores_the_deployable_model_on_raw_inputs_from_round_0(
    task_identity,
) -> None:
    # Prepare: a server-held test set of raw images
    held_out = images(30, seed=99)
    x = torch.stack([item[0] for item in held_out])
    y = torch.tensor([item[1] for item in held_out])
    seen: dict[int, set[str]] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = extractor_and_server(copy.deepcopy(seeded_edge().extractor), server_model())
        model.load_state_dict(arrays.to_torch_state_dict())  # strict: every key
        seen[server_round] = set(arrays.keys())
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
        return MetricRecord({"accuracy": accuracy})

    grid = HandlerGrid(client_handlers(lambda pid: 5), num_nodes=2)
    # Execute
    result = strategy().start(
        grid=grid, initial_arrays=ArrayRecord(), num_rounds=3, evaluate_fn=evaluate_fn
    )
    # Assert: every round (0 included) got extractor + server weights ...
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(any(k.startswith("extractor.") for k in keys) for keys in seen.values())
    assert all(any(k.startswith("server.") for k in keys) for keys in seen.values())
    # ... the model learnt the task from raw inputs, and Result.arrays is that model
    accuracies = [result.evaluate_metrics_serverapp[r]["accuracy"] for r in (0, 3)]
    assert accuracies[1] >= 0.9 > accuracies[0], accuracies
    final = extractor_and_server(copy.deepcopy(seeded_edge().extractor), server_model())
    final.load_state_dict(result.arrays.to_torch_state_dict())
    assert (final.eval()(x).argmax(1) == y).float().mean().item() >= 0.9


def test_a_node_with_another_extractor_is_rejected_with_the_fix(task_identity) -> None:
    # Prepare: node 1 builds its edge model from another seed
    grid = HandlerGrid(client_handlers(lambda pid: 5 + pid), num_nodes=2)
    fedgkt = strategy()
    # Execute
    fedgkt.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=1)
    # Assert: node 0 trained, node 1's replies were rejected, naming the fix
    record = fedgkt.history[-1]
    assert record["train_nodes"] == 1 and record["eval_nodes"] == 1
    reasons = {r["node_key"]: r["reason"] for r in record["rejected_replies"]}
    assert set(reasons) == {"1"}
    assert "not the strategy's" in reasons["1"] and "same seed" in reasons["1"]


def test_initial_arrays_may_hold_the_deployable_model_with_the_same_extractor() -> None:
    # Prepare: a deployable state whose server part differs from the strategy's
    fedgkt = strategy()
    other = server_model()
    nn.init.constant_(other[1].weight, 0.5)
    state = extractor_and_server(seeded_edge().extractor, other).state_dict()
    # Execute
    fedgkt.prepare(ArrayRecord(state), num_rounds=1)
    # Assert: the server model took the server part
    assert torch.equal(fedgkt.trainer.model[1].weight, other[1].weight)
    # ... and a deployable state with another extractor is refused
    foreign = extractor_and_server(seeded_edge(seed=9).extractor, other).state_dict()
    with pytest.raises(ValueError, match="another extractor"):
        strategy().prepare(ArrayRecord(foreign), num_rounds=1)


def test_the_extractor_digest_is_the_same_for_the_same_seed_only() -> None:
    assert module_digest(seeded_edge(5).extractor) == module_digest(seeded_edge(5).extractor)
    assert module_digest(seeded_edge(5).extractor) != module_digest(seeded_edge(6).extractor)
