"""FedAvg ServerApp: the full model, Flower's FedAvg (metered), ``results.json``."""

from __future__ import annotations

import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_fedgkt.accounting import model_profile
from flwr_fedgkt.data import DataUnavailableError, PartitionError, describe_dataset
from flwr_fedgkt.models import seeded_model
from flwr_fedgkt.results import ResultsWriter
from flwr_fedgkt.server_app import federation_data

from .config import FedAvgConfig
from .strategy import MeteredFedAvg

app = ServerApp()


def default_output_dir() -> Path:
    return Path.cwd() / "outputs" / time.strftime("%Y-%m-%d_%H-%M-%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for ``num-server-rounds`` rounds and write ``results.json``."""
    config = FedAvgConfig.from_mapping(context.run_config)
    run = config.run
    output_dir = Path(run.output_dir) if run.output_dir else default_output_dir()
    try:
        info = describe_dataset(run.dataset, data_dir=run.data_dir, seed=run.seed)
    except DataUnavailableError as err:
        log(ERROR, "%s", err)
        raise SystemExit(1) from None
    log(INFO, "Data set %s: %d classes (%s)", info.name, info.num_classes, info.source)

    model = seeded_model(config.model, info.num_classes, run.seed)
    initial_arrays = ArrayRecord(model.state_dict())
    profile = model_profile(config.model, info.num_classes)
    header = {
        "algorithm": "fedavg",
        "config": config.to_dict(),
        # every node trains the full model: it is the edge model here
        "edge_model": profile,
        "server_model": None,
        "model_bytes": initial_arrays.count_bytes(),
    }
    writer = ResultsWriter(output_dir, header)
    log(INFO, "FedAvg results go to %s", writer.path)
    try:  # a data set that cannot be split over the nodes stops here, with one message
        log(INFO, "Partitions: %s", federation_data(grid, run)[1])
    except (PartitionError, DataUnavailableError) as err:
        log(ERROR, "%s\nThe run stops before its first round.", err)
        writer.finish("failed", str(err))
        return

    strategy = MeteredFedAvg(
        lr_for_round=config.client_lr,
        on_round_end=writer,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_train_nodes,
        min_evaluate_nodes=run.min_evaluate_nodes,
        min_available_nodes=run.min_available_nodes,
        time_budget=run.time_budget,
    )
    strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=run.num_server_rounds,
        timeout=run.round_timeout,
        train_config=ConfigRecord(
            {"client-epochs": run.client_epochs, "batch-size": run.batch_size}
        ),
        evaluate_config=ConfigRecord(),
    )
    writer.finish("completed")
