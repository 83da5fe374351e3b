"""A run hands back the trained server model: ``Result.arrays`` after ``start()``,
and ``final_model.pt`` from the built-in ServerApp."""

import io

import torch
from flwr.app import ArrayRecord, Context
from inprocess import InProcessGrid, node_context, server_context

from flwr_fedgkt import build_model, server_app
from flwr_fedgkt.client import ContextStateStore
from flwr_fedgkt.models import extractor_and_server
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

RUN_CONFIG = {
    "dataset": "synthetic",
    "synthetic-samples-per-node": 64,
    "num-server-rounds": 1,
    "batch-size": 16,
    "seed": 4,
    "device": "cpu",
}


def _grid(run_config: dict) -> InProcessGrid:
    return InProcessGrid({10 + i: node_context(10 + i, i, 2, run_config) for i in range(2)})


def test_result_arrays_hold_the_trained_server_model(task_identity) -> None:
    # Prepare
    strategy = FedGKT.from_run_config(RunConfig.from_mapping(RUN_CONFIG), num_classes=10)
    initial = {k: v.clone() for k, v in strategy.trainer.model.state_dict().items()}
    # Execute
    result = strategy.start(grid=_grid(RUN_CONFIG), initial_arrays=ArrayRecord(), num_rounds=1)
    # Assert: the arrays are the model after training, not before
    returned = result.arrays.to_torch_state_dict()
    trained = strategy.trainer.model.state_dict()
    assert set(returned) == set(trained)
    for key, value in trained.items():
        assert torch.equal(returned[key], value.cpu()), key
    assert any(not torch.equal(initial[k], trained[k]) for k in trained)


def test_the_server_app_saves_a_final_model_that_loads_and_predicts_alike(
    task_identity, tmp_path
) -> None:
    # Prepare
    run_config = {**RUN_CONFIG, "output-dir": str(tmp_path)}
    context = server_context(run_config)
    # Execute
    server_app.main(_grid(run_config), context)
    # Assert: a fresh ResNet-55 with the saved weights gives the logits of the one
    # rebuilt from the run's last checkpoint
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    fresh = build_model("resnet55", 10)
    fresh.load_state_dict(saved)
    checkpoint = torch.load(tmp_path / "checkpoint-round-1.pt", weights_only=False)
    reference = build_model("resnet55", 10)
    reference.load_state_dict(checkpoint["trainer"]["model"])
    features = torch.relu(torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(0)))
    fresh.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(fresh(features), reference(features))
    assert not torch.equal(saved["fc.weight"], build_model("resnet55", 10).fc.weight)


def test_with_one_frozen_extractor_the_run_exports_extractor_and_server_as_one_model(
    task_identity, tmp_path
) -> None:
    # Prepare: every node starts from the seed's edge model and never trains its stem
    run_config = {
        **RUN_CONFIG,
        "num-server-rounds": 2,
        "output-dir": str(tmp_path),
        "shared-extractor-init": True,
        "freeze-extractor": True,
    }
    grid = _grid(run_config)
    context = server_context(run_config)
    # Execute
    server_app.main(grid, context)
    # Assert: the exported extractor is every node's extractor after training ...
    saved = torch.load(tmp_path / "deployable_model.pt", weights_only=True)
    model = extractor_and_server(build_model("resnet8", 10).stem, build_model("resnet55", 10))
    model.load_state_dict(saved)
    model.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    server = build_model("resnet55", 10)
    server.load_state_dict(torch.load(tmp_path / "final_model.pt", weights_only=True))
    server.eval()
    for ctx in grid.contexts.values():
        edge = build_model("resnet8", 10)
        edge.load_state_dict(_edge_state(ctx)["model"])
        edge.eval()
        for key, value in edge.stem.state_dict().items():
            assert torch.equal(model.extractor.state_dict()[key], value), key
        # ... and the pair predicts as the server model on that node's features
        with torch.no_grad():
            assert torch.equal(model(images), server(edge(images)[1]))


def test_without_a_shared_frozen_extractor_no_pair_is_exported(task_identity, tmp_path) -> None:
    run_config = {**RUN_CONFIG, "output-dir": str(tmp_path), "freeze-extractor": True}
    context = server_context(run_config)
    server_app.main(_grid(run_config), context)
    assert (tmp_path / "final_model.pt").exists()
    assert not (tmp_path / "deployable_model.pt").exists()


def _edge_state(context: Context) -> dict:
    blob = ContextStateStore(context).load()
    assert blob is not None
    return torch.load(io.BytesIO(blob), weights_only=True)
