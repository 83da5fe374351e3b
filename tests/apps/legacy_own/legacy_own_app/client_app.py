"""The legacy ClientApp: ``client_fn`` returns ``FedGKTNumPyClient`` on the node's
partition of the digits (flwr-datasets dict items) with the app's own edge model.

For the test, the factory that builds the edge model also writes what it built
(class name and parameter count) to ``<output-dir>/edge-model-<partition-id>.json``:
the proof that the nodes trained this model, not the built-in ResNet-8.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.client import Client, ClientApp

from flwr_fedgkt.legacy import FedGKTNumPyClient
from legacy_own_app.task import EdgeMLP, load_data, profile


def reporting_factory(report: Path | None) -> Callable[[], EdgeMLP]:
    """What builds the node's EdgeMLP (FedGKTNumPyClient calls it with torch's RNG
    seeded), writing the built model's profile to ``report``."""

    def build() -> EdgeMLP:
        model = EdgeMLP()
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(profile(model)))
        return model

    return build


def client_fn(context: Context) -> Client:
    """FedGKT's edge client on this node's train and test split."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(context.run_config["seed"])
    train, test = load_data(partition_id, num_partitions, seed)
    output_dir = str(context.run_config["output-dir"])
    report = Path(output_dir) / f"edge-model-{partition_id}.json" if output_dir else None
    # The flwr-datasets partitions as they are ({"img", "label"} dict items)
    return FedGKTNumPyClient(context, train, test, edge_model=reporting_factory(report)).to_client()


app = ClientApp(client_fn=client_fn)
