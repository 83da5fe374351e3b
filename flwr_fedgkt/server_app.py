"""FedGKT ServerApp: reads the run config, builds the strategy, writes results."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .accounting import model_profile
from .config import RunConfig
from .data import load_dataset
from .results import ResultsWriter
from .server import ServerTrainer
from .strategy import FedGKT

app = ServerApp()


def default_output_dir() -> Path:
    return Path.cwd() / "outputs" / time.strftime("%Y-%m-%d_%H-%M-%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedGKT for ``num-server-rounds`` rounds and write ``results.json``."""
    config = RunConfig.from_mapping(context.run_config)
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    _, num_classes = load_dataset(config.dataset, config.seed)

    trainer = ServerTrainer(
        num_classes,
        model_name=config.server_model,
        lr=config.server_lr,
        temperature=config.temperature,
        alpha=config.alpha,
        batch_size=config.server_batch_size,
        seed=config.seed,
        device=config.device,
        total_epochs=config.num_server_rounds * config.server_epochs,
    )
    header = {
        "algorithm": "fedgkt",
        "config": config.to_dict(),
        "edge_model": model_profile("resnet8", num_classes),
        "server_model": model_profile(config.server_model, num_classes),
    }
    writer = ResultsWriter(output_dir, header)
    log(20, "FedGKT results go to %s", writer.path)

    strategy = FedGKT(
        trainer,
        server_epochs=config.server_epochs,
        feature_dtype=config.feature_dtype,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_nodes,
        min_evaluate_nodes=config.min_evaluate_nodes,
        min_available_nodes=config.min_available_nodes,
        on_round_end=writer,
    )
    round_config = ConfigRecord(
        {
            "client-epochs": config.client_epochs,
            "client-lr": config.client_lr,
            "batch-size": config.batch_size,
            "temperature": config.temperature,
            "alpha": config.alpha,
        }
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=round_config,
        evaluate_config=ConfigRecord(),
    )
