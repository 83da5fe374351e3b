"""On a machine without a GPU nothing CUDA-only runs: device and precision
``auto`` pick the CPU, no batch is pinned, no CUDA call is made, and a round
trains and scores."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from inprocess import InProcessGrid, node_context

from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

RUN_CONFIG = {"dataset": "synthetic", "synthetic-samples-per-node": 30, "batch-size": 16}


def test_a_round_on_a_machine_without_cuda_makes_no_cuda_call(monkeypatch, task_identity) -> None:
    # Prepare: no CUDA, and every CUDA-only call fails the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def cuda_only(name: str):
        def call(*args, **kwargs):
            raise AssertionError(f"{name} called on a CPU-only machine")

        return call

    for name in ("synchronize", "is_bf16_supported", "get_device_capability", "set_device"):
        monkeypatch.setattr(torch.cuda, name, cuda_only(f"torch.cuda.{name}"))
    monkeypatch.setattr(torch.Tensor, "pin_memory", cuda_only("Tensor.pin_memory"))
    config = RunConfig.from_mapping({**RUN_CONFIG, "device": "auto", "precision": "auto"})
    strategy = FedGKT.from_run_config(config, num_classes=10)
    contexts = {101 + i: node_context(101 + i, i, 2, RUN_CONFIG) for i in range(2)}
    # Execute
    strategy.start(grid=InProcessGrid(contexts), initial_arrays=ArrayRecord(), num_rounds=1)
    # Assert
    assert strategy.trainer.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in strategy.trainer.model.parameters())
    (record,) = strategy.engine.history
    assert record["accuracy"] is not None and record["rejected_replies"] == []
    assert record["failed_nodes"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_batches_come_from_pinned_memory() -> None:
    from flwr_fedgkt.server_model import to_device

    batch = to_device(torch.ones(4, 16, 8, 8), torch.device("cuda"))
    assert batch.is_cuda and batch.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(ServerTrainer(10, device="cuda").model, torch.nn.Module)
