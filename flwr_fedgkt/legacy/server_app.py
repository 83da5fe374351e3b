"""The built-in legacy ServerApp's components: :func:`server_fn`.

Use as ``ServerApp(server_fn=server_fn)``. This module imports the Message-API
ServerApp's module (:mod:`flwr_fedgkt.server_app`) for its helpers, which builds a
``ServerApp`` on import; :mod:`flwr_fedgkt.legacy` does not import it.
"""

from __future__ import annotations

from functools import partial
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.server import ServerAppComponents, ServerConfig
from flwr.supercore import log

from ..accounting import model_profile
from ..data import describe_dataset
from ..results import ResultsWriter
from ..server_app import default_output_dir
from ..settings import ConfigError, RunConfig
from .strategy import LegacyFedGKT

__all__ = ["server_fn"]


def _write_round(writer: ResultsWriter, num_rounds: int, record: dict[str, Any]) -> None:
    """Write a round's record; after the last round, mark the run completed."""
    writer(record)
    if record["round"] >= num_rounds:
        writer.finish("completed")


def server_fn(context: Context) -> ServerAppComponents:
    """The legacy ServerApp's components, configured from the run config.

    :class:`~flwr_fedgkt.legacy.LegacyFedGKT` with the same server model, optimizer
    and schedule as the Message-API ServerApp, writing the same ``results.json`` to
    ``output-dir``; the ``ServerConfig`` runs ``num-server-rounds`` rounds of at
    most ``round-timeout`` seconds. Use as ``ServerApp(server_fn=server_fn)``.
    """
    config = RunConfig.from_mapping(context.run_config)
    if config.resume_from:  # the legacy Server numbers rounds from 1 in every run
        raise ConfigError(
            "resume-from: the legacy-API ServerApp cannot resume a run; resume with the "
            "Message-API ServerApp (flwr_fedgkt.server_app), which reads the same checkpoints"
        )
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    num_classes = describe_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed
    ).num_classes
    header = {
        "algorithm": "fedgkt",
        "flower_api": "legacy",
        "config": config.to_dict(),
        "edge_model": model_profile("resnet8", num_classes),
        "server_model": model_profile(config.server_model, num_classes),
    }
    writer = ResultsWriter(output_dir, header)
    log(INFO, "FedGKT results go to %s", writer.path)
    strategy = LegacyFedGKT.from_run_config(
        config,
        num_classes,
        output_dir,
        on_round_end=partial(_write_round, writer, config.num_server_rounds),
    )
    server_config = ServerConfig(
        num_rounds=config.num_server_rounds, round_timeout=config.round_timeout
    )
    return ServerAppComponents(strategy=strategy, config=server_config)
