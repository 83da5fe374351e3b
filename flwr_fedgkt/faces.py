"""What the Flower faces of FedGKT share: a :class:`~flwr_fedgkt.rounds.RoundEngine`,
the views users read off a strategy, the constructor from a run's config and the
summary of the engine's settings.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from .registry import SampleIds
from .rounds import RoundEngine
from .server import ServerTrainer
from .settings import RunConfig
from .store import FeatureStore

__all__ = ["HoldsEngine", "engine_settings", "log_engine_summary"]

logger = logging.getLogger("flwr.fedgkt")


def engine_settings(config: RunConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """The engine's keyword arguments a run's config asks for (besides the
    trainer: :meth:`ServerTrainer.from_run_config`). The built-in data sets
    number samples globally. With ``output_dir``, checkpoints go there and so
    does the disk store."""
    out = None if output_dir is None else Path(output_dir)
    disk = config.feature_store == "disk" and out is not None
    return {
        "server_epochs": config.server_epochs,
        "feature_dtype": config.feature_dtype,
        "max_reply_bytes": config.max_reply_bytes,
        "max_staleness": None if config.max_staleness < 0 else config.max_staleness,
        "store": FeatureStore(out / "feature-store" if disk and out is not None else None),
        "checkpoint_dir": out,
        "freeze_extractor": config.freeze_extractor,
        "freeze_after": None if config.freeze_after < 0 else config.freeze_after,
        "compression": config.compression,
        "max_feature_abs": config.max_feature_abs,
        "max_logit_abs": config.max_logit_abs,
        "global_sample_ids": True,
        "seed": config.seed,
        "max_idle_rounds": config.max_idle_rounds,
        "defences": config.defences,
    }


def log_engine_summary(engine: RoundEngine) -> None:
    """Log the round engine's settings (a strategy's summary)."""
    trainer = engine.trainer
    logger.info("\t└──> Group knowledge transfer:")
    logger.info(
        "\t\t├── Server model: %s (%d params) on %s",
        trainer.model_name,
        trainer.num_parameters,
        trainer.device,
    )
    logger.info(
        "\t\t├── Server epochs per round: %d | KD T=%.2f alpha=%.2f | precision %s",
        engine.step.server_epochs,
        trainer.temperature,
        trainer.alpha,
        trainer.precision,
    )
    logger.info(
        "\t\t├── Features: %s, shape %s, stored %s",
        engine.feature_dtype,
        "x".join(map(str, engine.feature_shape)),
        "in memory" if engine.store.directory is None else f"on disk ({engine.store.directory})",
    )
    if engine.freeze_after is None:
        frozen = "never"
    elif engine.freeze_after == 0:
        frozen = "from the start"
    else:
        frozen = f"after round {engine.freeze_after}"
    logger.info(
        "\t\t├── Compression: %s | edge extractor frozen: %s | unchanged features "
        "are not sent again",
        engine.compression,
        frozen,
    )
    logger.info(
        "\t\t├── Max |feature|: %g | max |edge logit|: %g | global sample ids: %s",
        engine.max_feature_abs,
        engine.validator.max_logit_abs,
        "yes" if engine.registry.global_sample_ids else "no",
    )
    logger.info(
        "\t\t└── Max reply bytes: %s | max staleness: %s | checkpoints: %s",
        engine.max_reply_bytes or "unlimited",
        "unlimited" if engine.step.max_staleness is None else f"{engine.step.max_staleness} rounds",
        engine.recorder.checkpoint_dir or "off",
    )


class HoldsEngine:
    """What both Flower faces share: a :class:`RoundEngine` (``self.engine``), the
    views users read off a strategy, and the constructor from a run's config."""

    engine: RoundEngine

    @classmethod
    def from_run_config(
        cls,
        config: RunConfig,
        num_classes: int,
        output_dir: str | Path | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        sample_ids: SampleIds | None = None,
    ) -> Self:
        """The strategy a run's config asks for: the paper's server model by name,
        Flower's sampling knobs and the engine's settings
        (:func:`engine_settings`), the same for every face; ``sample_ids``: the
        ids of each key's partition (:func:`~flwr_fedgkt.node.partition_sample_ids`)."""
        return cls(  # type: ignore[call-arg]
            ServerTrainer.from_run_config(config, num_classes),
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=config.min_train_nodes,
            min_evaluate_nodes=config.min_evaluate_nodes,
            min_available_nodes=config.min_available_nodes,
            query_timeout=min(config.query_timeout, config.round_timeout),
            on_round_end=on_round_end,
            sample_ids=sample_ids,
            **{**engine_settings(config, output_dir), **cls.face_settings(config)},
        )

    @classmethod
    def face_settings(cls, config: RunConfig) -> dict[str, Any]:
        """Keyword arguments of one face's own, or in place of the engine's
        (none here)."""
        return {}

    @property
    def trainer(self) -> ServerTrainer:
        """The server model with its optimizer."""
        return self.engine.trainer

    @property
    def store(self) -> FeatureStore:
        """The features the server keeps, by node key."""
        return self.engine.store

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per finished round (what ``results.json`` holds)."""
        return self.engine.history
