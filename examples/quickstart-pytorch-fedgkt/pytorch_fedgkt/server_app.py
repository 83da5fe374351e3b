"""pytorch_fedgkt: the ServerApp (the server side of FedGKT).

FedGKT averages no weights: the strategy trains ServerNet on the features the
nodes upload and sends each node the server logits of its own samples. The run's
round records go to ``results.json`` and the trained ServerNet to
``final_model.pt``, both in ``output-dir``.
"""

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_fedgkt import FedGKT
from pytorch_fedgkt.task import FEATURE_SHAPE, ServerNet, seeded

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedGKT for ``num-server-rounds`` rounds."""
    config = context.run_config
    output_dir = Path(str(config["output-dir"]) or f"outputs/{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {"run_config": dict(config), "rounds": []}

    def write_round(record: dict) -> None:  # after every round: a crash keeps the rounds done
        results["rounds"].append(record)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))

    strategy = FedGKT(
        seeded(ServerNet, int(config["seed"])),
        feature_shape=FEATURE_SHAPE,
        server_epochs=int(config["server-epochs"]),
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        on_round_end=write_round,
        seed=int(config["seed"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # no global model to send: the server keeps its own
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord(  # the nodes' training settings, every round
            {key: config[key] for key in ("client-lr", "client-epochs", "batch-size")}
        ),
    )

    torch.save(result.arrays.to_torch_state_dict(), output_dir / "final_model.pt")
    print(f"Results and final server model: {output_dir}")
