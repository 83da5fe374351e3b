"""FedGKT ServerApp: reads the run config, builds the strategy, writes results."""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .accounting import model_profile
from .asynchronous import AsyncFedGKT
from .checkpoint import CheckpointError, load_latest_checkpoint
from .data import (
    DataUnavailableError,
    PartitionError,
    describe_dataset,
    plot_label_distribution,
)
from .edge import extractor_of
from .models import build_model, extractor_and_server
from .node import check_node_data, edge_model_factory, partition_sample_ids
from .pipeline import PipelinedFedGKT
from .recorder import NoProgressError
from .results import ResultsWriter
from .settings import RunConfig
from .strategy import FedGKT, wait_for_nodes

app = ServerApp()

SCHEDULES: dict[str, type[FedGKT]] = {
    "sync": FedGKT,
    "pipeline": PipelinedFedGKT,
    "async": AsyncFedGKT,
}
"""The strategy of each ``mode``."""


def federation_data(grid: Grid, config: RunConfig) -> tuple[int, str]:
    """Before a run: wait for ``min-available-nodes`` nodes, then check that the
    run's data set splits into one partition per connected node
    (:func:`~flwr_fedgkt.node.check_node_data`). The number of nodes and a line
    saying how the data splits; :class:`~flwr_fedgkt.data.PartitionError` or
    :class:`~flwr_fedgkt.data.DataUnavailableError` when it does not."""
    num_nodes = len(wait_for_nodes(grid, max(config.min_available_nodes, 1)))
    return num_nodes, check_node_data(config, num_nodes)


def default_output_dir() -> Path:
    return Path.cwd() / "outputs" / time.strftime("%Y-%m-%d_%H-%M-%S")


def plot_partitions(num_nodes: int, config: RunConfig, output_dir: Path) -> None:
    """Write ``label_distribution.png`` to ``output_dir``: the training labels of
    every partition, one partition per node connected when the run starts (as in
    simulation, where ``num-partitions`` is the number of SuperNodes)."""
    try:
        path = plot_label_distribution(
            output_dir / "label_distribution.png",
            config.dataset,
            num_nodes,
            config.partitioner,
            config.dirichlet_alpha,
            config.seed,
            classes_per_partition=config.classes_per_partition,
            min_partition_size=config.min_partition_size,
            data_dir=config.data_dir,
            synthetic_samples_per_node=config.synthetic_samples_per_node,
        )
    except (OSError, ValueError, DataUnavailableError) as err:
        log(WARNING, "No label-distribution plot: %s", err)
        return
    log(INFO, "Label distribution of %d partitions: %s", num_nodes, path)


def save_final_model(arrays: ArrayRecord, path: Path) -> None:
    """Save the trained server model's ``state_dict`` (``torch.load`` it into a server
    model of the same name and classes). It maps edge *features* to logits: for
    inference, put a node's edge extractor (the ResNet-8 stem) in front of it."""
    if not arrays:  # no round trained
        return
    torch.save(arrays.to_torch_state_dict(), path)
    log(INFO, "Final server model: %s", path)


def save_deployable_model(
    arrays: ArrayRecord, config: RunConfig, num_classes: int, path: Path
) -> None:
    """With ``shared-extractor-init`` and ``freeze-extractor`` every node's
    extractor is the ResNet-8 stem initialised from ``seed`` and never trained, so
    the server knows it: save it with the trained server model as one model for
    inference on images (:func:`~flwr_fedgkt.models.extractor_and_server`)."""
    if not arrays or not (config.shared_extractor_init and config.freeze_extractor):
        return
    server = build_model(config.server_model_name, num_classes)
    server.load_state_dict(arrays.to_torch_state_dict())
    edge = edge_model_factory(config, num_classes, partition_id=0)()  # every node's start
    torch.save(extractor_and_server(extractor_of(edge), server).state_dict(), path)
    log(INFO, "Extractor + server model, for inference on images: %s", path)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedGKT for ``num-server-rounds`` rounds and write ``results.json``.

    However the run ends, ``results.json`` says how: ``completed``, ``failed`` (with
    the error; an exception is re-raised, so Flower reports its exit code) or
    ``no-progress``.
    """
    config = RunConfig.from_mapping(context.run_config)
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    header: dict = {"algorithm": "fedgkt", "config": config.to_dict()}
    try:  # before anything starts: a run without its data stops here, with one message
        info = describe_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    except DataUnavailableError as err:
        # logged, not raised: Flower would add a traceback to a message that says it all
        log(ERROR, "%s\nThe run stops before its first round.", err)
        ResultsWriter(output_dir, header).finish("failed", str(err))
        return
    log(INFO, "Data set %s", info.summary())
    num_classes = info.num_classes
    header["edge_model"] = model_profile(config.edge_model_name, num_classes)
    header["server_model"] = model_profile(config.server_model_name, num_classes)
    writer = ResultsWriter(output_dir, header)
    log(INFO, "FedGKT results go to %s", writer.path)
    try:
        status, error = run(grid, config, num_classes, output_dir, writer)
    except BaseException as err:
        # results.json says how the run ended; Flower reports the error's exit code
        writer.finish("failed", f"{type(err).__name__}: {err}")
        raise
    writer.finish(status, error)


def run(
    grid: Grid, config: RunConfig, num_classes: int, output_dir: Path, writer: ResultsWriter
) -> tuple[str, str | None]:
    """The rounds of a run whose data set is there: ``(status, error)`` of a run
    that ended without an exception (a stop before round 1 is ``failed``, with one
    message in the log)."""
    try:  # a data set that cannot be split over the nodes stops here, with one message
        num_nodes, split = federation_data(grid, config)
        log(INFO, "Partitions: %s", split)
    except (PartitionError, DataUnavailableError) as err:
        log(ERROR, "%s\nThe run stops before its first round.", err)
        return "failed", str(err)
    plot_partitions(num_nodes, config, output_dir)

    schedule = SCHEDULES[config.schedule]
    strategy = schedule.from_run_config(
        config,
        num_classes,
        output_dir,
        on_round_end=writer,
        sample_ids=partition_sample_ids(config, num_nodes),
    )
    engine = strategy.engine
    writer.header["server_precision"] = strategy.trainer.precision  # chosen for this machine
    writer.write()
    if config.resume_from:
        try:
            state, path, skipped = load_latest_checkpoint(config.resume_from)
        except CheckpointError as err:
            log(ERROR, "%s\nThe run stops before its first round.", err)
            return "failed", str(err)
        for note in skipped:
            log(WARNING, "Skipped an unreadable checkpoint: %s", note)
        engine.load_state_dict(state)
        writer.rounds = list(engine.history)
        writer.write()
        log(
            INFO,
            "Resuming from %s: %s",
            path,
            f"server epoch {engine.version_offset + 1} is next"
            if config.schedule == "async"
            else f"round {engine.round_offset + 1} is next",
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
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            # asynchronous: the run's length, counting the server epochs done before
            num_rounds=config.num_server_rounds
            - (0 if config.schedule == "async" else engine.round_offset),
            timeout=config.round_timeout,
            train_config=round_config,
            evaluate_config=ConfigRecord(),
        )
    except NoProgressError as err:  # said in results.json and the log; not a crash
        log(ERROR, "The run stops: %s", err)
        writer.header["no_progress_reasons"] = err.reasons
        return "no-progress", str(err)
    save_final_model(result.arrays, output_dir / "final_model.pt")
    save_deployable_model(result.arrays, config, num_classes, output_dir / "deployable_model.pt")
    return "completed", None
