"""custom_models: the ServerApp, training ServerMLP on the nodes' 32-value features.

``ServerTrainer`` wraps the server model with its training settings; the features
travel as int8 (a quarter of float32's bytes). The round records go to
``results.json`` and the trained ServerMLP to ``final_model.pt``, in ``output-dir``.
"""

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from custom_models.task import FEATURE_SHAPE, new_server_model
from flwr_fedgkt import FedGKT, ServerTrainer

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

    num_rounds = int(config["num-server-rounds"])
    server_epochs = int(config["server-epochs"])
    trainer = ServerTrainer(
        model=new_server_model(int(config["seed"])),
        feature_shape=FEATURE_SHAPE,
        lr=float(config["server-lr"]),
        batch_size=int(config["server-batch-size"]),
        temperature=float(config["temperature"]),
        alpha=float(config["alpha"]),
        total_epochs=num_rounds * server_epochs,  # cosine decay of lr over the whole run
        seed=int(config["seed"]),
    )
    strategy = FedGKT(
        trainer,
        feature_dtype="int8",
        server_epochs=server_epochs,
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        on_round_end=write_round,
        seed=int(config["seed"]),
    )
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=num_rounds)

    torch.save(result.arrays.to_torch_state_dict(), output_dir / "final_model.pt")
    print(f"Results and final server model: {output_dir}")
