"""The legacy ServerApp: ``server_fn`` returns ``LegacyFedGKT`` with the app's own
server model, and ``FedAvg``'s argument names.

``results.json`` in ``output-dir`` is written with ``flwr_fedgkt.results.ResultsWriter``
as ``on_round_end`` (as the legacy-API example's README says): the app's header
(run config, both models' profiles) and one record per round; ``status`` becomes
``completed`` after the last round. ``evaluate_fn`` is not given: ``LegacyFedGKT``
refuses it (FedGKT has no global weights; the server model is scored on the
nodes' test features, the round record's ``accuracy``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from flwr_fedgkt.legacy import LegacyFedGKT
from flwr_fedgkt.results import ResultsWriter
from legacy_own_app.task import FEATURE_SHAPE, EdgeMLP, ServerMLP, profile


def server_fn(context: Context) -> ServerAppComponents:
    """LegacyFedGKT on the app's ServerMLP, for ``num-server-rounds`` rounds."""
    config = context.run_config
    num_rounds = int(config["num-server-rounds"])
    seed = int(config["seed"])
    output_dir = Path(str(config["output-dir"]) or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        server_model = ServerMLP()
    header = {
        "algorithm": "fedgkt",
        "flower_api": "legacy",
        "run_config": dict(config),
        "edge_model": profile(EdgeMLP()),
        "server_model": profile(server_model),
    }
    writer = ResultsWriter(output_dir.resolve(), header)

    def on_round_end(record: dict[str, Any]) -> None:
        writer(record)
        if record["round"] >= num_rounds:
            writer.finish("completed")

    strategy = LegacyFedGKT(
        server_model,
        feature_shape=FEATURE_SHAPE,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=2,
        min_evaluate_clients=2,
        min_available_clients=2,
        server_epochs=int(config["server-epochs"]),
        seed=seed,
        on_round_end=on_round_end,
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=num_rounds))


app = ServerApp(server_fn=server_fn)
