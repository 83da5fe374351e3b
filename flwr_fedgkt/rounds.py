"""The server's side of a FedGKT round, without Flower.

:class:`RoundEngine` is what the Flower faces (:class:`flwr_fedgkt.strategy.FedGKT`
and its schedules on the Message API, :class:`flwr_fedgkt.legacy.LegacyFedGKT` on
the legacy API) and :func:`flwr_fedgkt.local.run_local` hold and drive. It joins
three parts with one job each:

- validation (:class:`~flwr_fedgkt.validation.ReplyValidator`): a reply in,
  accepted or rejected with its reason out;
- the server step (:class:`~flwr_fedgkt.server_step.ServerStep`): store, train,
  server logits per node, scores;
- the recorder (:class:`~flwr_fedgkt.recorder.RoundRecorder`): the round's log,
  history, ``on_round_end``, checkpoints, no-progress.

and keeps what a round needs before its replies: node sampling and keys, and
each node's instructions. A round, as calls: :meth:`~RoundEngine.begin_round`,
:meth:`~RoundEngine.sample` and :meth:`~RoundEngine.instructions`;
:meth:`~RoundEngine.accept` per reply; :meth:`~RoundEngine.train_round`;
:meth:`~RoundEngine.close_round`. Each round has its own :class:`RoundLog`
(pipelined rounds overlap), found by its number.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Self

import numpy as np
from torch import nn

from .checkpoint import rng_state, set_rng_state
from .codec import NodeKey, PayloadError, check_dtype_name
from .compression import check_compression
from .precision import TRAINING_PRECISIONS
from .recorder import NoProgressError, RoundLog, RoundRecorder, failure_line
from .registry import NodeRegistry
from .server import ServerTrainer, output_classes
from .server_step import ServerStep, TrainingJob
from .settings import DEFAULTS, RunConfig
from .store import FeatureStore
from .validation import (
    COMPRESSION_KEY,
    NODE_KEY,
    PRECISION_KEY,
    AcceptedReply,
    Rejection,
    ReplyParts,
    ReplyReader,
    ReplyValidator,
    validate_node_key,
)

__all__ = [
    "COMPRESSION_KEY",
    "NODE_KEY",
    "PRECISION_KEY",
    "AcceptedReply",
    "HoldsEngine",
    "NoProgressError",
    "ReplyParts",
    "ReplyReader",
    "RoundEngine",
    "RoundLog",
    "TrainingJob",
    "failure_line",
    "sample_size",
]

# Under Flower's logger, so that the round's lines appear in Flower's log
logger = logging.getLogger("flwr.fedgkt")


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """Nodes to sample out of ``num_nodes``: ``fraction`` of them, at least ``minimum``
    and at least one; none when ``fraction`` is 0."""
    if fraction == 0.0:
        return 0
    return max(int(num_nodes * fraction), minimum, 1)


class RoundEngine:
    """The server side of FedGKT: the three parts of a round (validation, server
    step, recorder), node keys and sampling. Its parameters are documented on
    :class:`flwr_fedgkt.strategy.FedGKT`, which holds one."""

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        trainer: ServerTrainer | nn.Module,
        *,
        server_epochs: int = DEFAULTS.server_epochs,
        feature_dtype: str = DEFAULTS.feature_dtype,
        feature_shape: tuple[int, ...] | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        max_reply_bytes: int = DEFAULTS.max_reply_bytes,
        max_staleness: int | None = None,
        store: FeatureStore | None = None,
        checkpoint_dir: str | Path | None = None,
        freeze_extractor: bool = DEFAULTS.freeze_extractor,
        freeze_after: int | None = None,
        compression: str = DEFAULTS.compression,
        max_feature_abs: float = DEFAULTS.max_feature_abs,
        max_logit_abs: float = DEFAULTS.max_logit_abs,
        global_sample_ids: bool = False,
        seed: int = DEFAULTS.seed,
        max_idle_rounds: int = DEFAULTS.max_idle_rounds,
    ) -> None:
        check_dtype_name(feature_dtype)
        check_compression(compression)
        if freeze_extractor and freeze_after is not None:
            raise ValueError(
                "give freeze_extractor (frozen from the start) or freeze_after, not both"
            )
        if freeze_after is not None and freeze_after < 0:
            raise ValueError(f"freeze_after must not be negative, got {freeze_after}")
        if not isinstance(trainer, ServerTrainer):  # a server model: default training
            if feature_shape is None:
                raise ValueError("give the feature_shape that your server model takes")
            trainer = ServerTrainer(model=trainer, feature_shape=feature_shape)
        feature_shape = trainer.feature_shape if feature_shape is None else feature_shape
        if feature_shape is None:
            raise ValueError("give the feature_shape that the server model takes")
        classes = output_classes(trainer.model, tuple(feature_shape))
        if classes != trainer.num_classes:
            raise ValueError(
                f"the server model gives {classes} logits for features of shape "
                f"{tuple(feature_shape)}, but its trainer expects {trainer.num_classes} classes"
            )
        store = FeatureStore() if store is None else store
        checkpoints = None if checkpoint_dir is None else Path(checkpoint_dir)
        # a replaced upload's files stay while a kept checkpoint may name them
        store.keep_retired = checkpoints is not None
        self.feature_dtype = feature_dtype
        self.feature_shape = tuple(feature_shape)
        self.freeze_after = 0 if freeze_extractor else freeze_after
        self.compression = compression
        self.registry = NodeRegistry(global_sample_ids)
        self.sampler = random.Random(seed)
        self.keyless: set[int] = set()  # nodes that could not say their key
        self.round_offset = 0  # rounds done before a resume
        self.connected: Callable[[], Collection[int]] = tuple
        self.recorder = RoundRecorder(on_round_end, checkpoints, max_idle_rounds)
        self.step = ServerStep(trainer, store, server_epochs, max_staleness, self.recorder.reject)
        self.validator = ReplyValidator(
            feature_dtype=feature_dtype,
            feature_shape=self.feature_shape,
            num_classes=trainer.num_classes,
            compression=compression,
            max_reply_bytes=max_reply_bytes,
            max_feature_abs=max_feature_abs,
            max_logit_abs=max_logit_abs,
            registry=self.registry,
            held_payload=self.step.held_payload,
            connected=lambda: self.connected(),
        )
        self.logs: dict[int, RoundLog] = {}  # the open rounds' logs
        self._latest = RoundLog(round=0)

    @staticmethod
    def settings(config: RunConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
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
        }

    # -- views ------------------------------------------------------------------------
    @property
    def trainer(self) -> ServerTrainer:
        return self.step.trainer

    @property
    def store(self) -> FeatureStore:
        return self.step.store

    @property
    def server_logits(self) -> dict[NodeKey, tuple[np.ndarray, np.ndarray]]:
        return self.step.server_logits

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.recorder.history

    @property
    def current(self) -> RoundLog:
        """The log of the newest round opened (for inspection)."""
        return self._latest

    @property
    def max_reply_bytes(self) -> int:
        return self.validator.max_reply_bytes

    @property
    def max_feature_abs(self) -> float:
        return self.validator.max_feature_abs

    @property
    def server_epochs(self) -> int:
        return self.step.server_epochs

    # -- configuration -----------------------------------------------------------------
    def summary(self) -> None:
        """Log the engine's settings (the strategy's summary)."""
        trainer = self.trainer
        logger.info("\t└──> Group knowledge transfer:")
        logger.info(
            "\t\t├── Server model: %s (%d params) on %s",
            trainer.model_name,
            trainer.num_parameters,
            trainer.device,
        )
        logger.info(
            "\t\t├── Server epochs per round: %d | KD T=%.2f alpha=%.2f | precision %s",
            self.step.server_epochs,
            trainer.temperature,
            trainer.alpha,
            trainer.precision,
        )
        logger.info(
            "\t\t├── Features: %s, shape %s, stored %s",
            self.feature_dtype,
            "x".join(map(str, self.feature_shape)),
            "in memory" if self.store.directory is None else f"on disk ({self.store.directory})",
        )
        if self.freeze_after is None:
            frozen = "never"
        elif self.freeze_after == 0:
            frozen = "from the start"
        else:
            frozen = f"after round {self.freeze_after}"
        logger.info(
            "\t\t├── Compression: %s | edge extractor frozen: %s | unchanged features "
            "are not sent again",
            self.compression,
            frozen,
        )
        logger.info(
            "\t\t├── Max |feature|: %g | max |edge logit|: %g | global sample ids: %s",
            self.max_feature_abs,
            self.validator.max_logit_abs,
            "yes" if self.registry.global_sample_ids else "no",
        )
        logger.info(
            "\t\t└── Max reply bytes: %s | max staleness: %s | checkpoints: %s",
            self.max_reply_bytes or "unlimited",
            "unlimited" if self.step.max_staleness is None else f"{self.step.max_staleness} rounds",
            self.recorder.checkpoint_dir or "off",
        )

    # -- configure: sampling and what each node gets --------------------------------------
    def sample(self, node_ids: Collection[int], size: int) -> list[int]:
        """``size`` of the connected ``node_ids``, drawn from the engine's generator
        (seeded by ``seed``). Nodes whose key the server knows are drawn by key
        (node ids change when a federation restarts, keys do not), the others by
        node id after them: the same keys (or node ids) give the same sample in
        every run, and a resumed run samples as the uninterrupted one."""
        keyed = sorted((k, n) for n in node_ids if (k := self.registry.key_of(n)) is not None)
        candidates = [n for _, n in keyed] + self.unkeyed(node_ids)
        return sorted(self.sampler.sample(candidates, size))

    def unkeyed(self, node_ids: Collection[int]) -> list[int]:
        """The ``node_ids`` whose node key the server does not know yet."""
        return sorted(n for n in node_ids if self.registry.key_of(n) is None)

    def keys_to_ask(self, node_ids: Collection[int]) -> list[int]:
        """The ``node_ids`` to ask for their key: those whose key the server does
        not know, but for the ones that could not say it before
        (:meth:`no_key`)."""
        return [n for n in self.unkeyed(node_ids) if n not in self.keyless]

    def no_key(self, node_ids: Collection[int]) -> None:
        """These nodes could not say their key (e.g. a ClientApp without a query
        handler): they are not asked again, and are bound to the key of their
        first accepted reply."""
        self.keyless.update(node_ids)

    def learn_key(self, node_id: int, key: Any) -> NodeKey | None:
        """Bind ``node_id`` to the node key it answered a key query with, so that it
        is sampled by key and gets its own server logits from its first round on
        (also the first round of a resumed run, whose node ids are new). A key that
        is not valid, or that another connected node holds, is logged and not
        bound (None)."""
        try:
            key = validate_node_key(key)
            self.registry.check_binding(key, node_id, self.connected())
        except PayloadError as err:
            logger.warning("node %s's key is not taken: %s", node_id, err)
            return None
        moved = self.registry.commit(key, node_id)
        if moved is not None:
            logger.info("node key %r moved from node %d (gone) to node %d", key, moved, node_id)
        return key

    def begin_round(self, server_round: int) -> RoundLog:
        """Open the log of round ``server_round`` (at the start of its training)."""
        log = self.recorder.open(server_round)
        self.logs[server_round] = log
        self._latest = log
        return log

    def log_of(self, server_round: int) -> RoundLog:
        """The log of open round ``server_round`` (opened now if it is not)."""
        log = self.logs.get(server_round)
        return self.begin_round(server_round) if log is None else log

    def frozen(self, server_round: int) -> bool:
        """Whether the nodes train round ``server_round`` with their extractor
        frozen (``freeze-extractor``: every round; ``freeze-after = K``: after
        round K)."""
        return self.freeze_after is not None and server_round > self.freeze_after

    def round_config(self, server_round: int, held: str = "") -> dict[str, Any]:
        """The settings every instruction carries: the two each reply must echo
        back, the round's compression, whether the extractor is frozen, and the
        digest of the features the server holds for the node (``held``; a node
        whose features have this digest sends none)."""
        return {
            "server-round": server_round,
            "feature-dtype": self.feature_dtype,
            COMPRESSION_KEY: self.compression,
            "freeze-extractor": self.frozen(server_round),
            "held-features": held,
        }

    def instructions(
        self, node_id: int, training: bool = True
    ) -> tuple[str, tuple[np.ndarray, np.ndarray] | None]:
        """For ``node_id``: the digest of the features the server holds for it
        (``""``: none), and (training) its own ``(ids, logits)`` from the server, if
        the server has any for its key."""
        key = self.registry.key_of(node_id)
        held = self.step.held(key, training)
        logits = self.step.server_logits.get(key) if training and key is not None else None
        return held, logits

    # -- replies ---------------------------------------------------------------------------
    def record_failure(self, server_round: int, node_id: int | None, reason: str | None) -> None:
        """A node of round ``server_round`` whose ClientApp raised or that did not
        reply in time (:meth:`RoundRecorder.failure`)."""
        self.recorder.failure(self.log_of(server_round), node_id, reason)

    def record_missing(
        self, server_round: int, sampled: Collection[int], replied: Collection[int]
    ) -> None:
        """Sampled nodes that sent nothing back before the round's timeout."""
        self.recorder.missing(self.log_of(server_round), sampled, replied)

    def accept(self, reply: ReplyReader, server_round: int, training: bool) -> AcceptedReply | None:
        """Validate one reply of round ``server_round``
        (:meth:`ReplyValidator.check`); an accepted one binds its node key and
        notes its samples, a rejected one goes into the round's log with its
        reason (None). Nothing a node sends raises out of here."""
        log = self.log_of(server_round)
        log.bytes_up += reply.nbytes
        checked = self.validator.check(reply, server_round, training)
        if isinstance(checked, Rejection):
            self.recorder.reject(log, checked.node_id, checked.key, checked.reason)
            return None
        if training and checked.precision in TRAINING_PRECISIONS:  # what the node used
            log.edge_precision[checked.precision] = log.edge_precision.get(checked.precision, 0) + 1
        split = "train" if training else "test"
        moved = self.registry.commit(
            checked.key, checked.node_id, checked.payload, split, checked.digest
        )
        if moved is not None:
            logger.info(
                "node key %r moved from node %d (gone) to node %d",
                checked.key,
                moved,
                checked.node_id,
            )
        return checked

    # -- the server step ----------------------------------------------------------------------
    def train_round(self, server_round: int, accepted: list[AcceptedReply]) -> dict[str, float]:
        """Store the accepted features, train the server model, refresh server logits
        (:meth:`start_training`, :meth:`run_training`, :meth:`finish_training`).
        Returns the round's training metrics."""
        job = self.start_training(server_round, accepted)
        self.run_training(job)
        return self.finish_training(job)

    def start_training(self, server_round: int, accepted: list[AcceptedReply]) -> TrainingJob:
        """Store round ``server_round``'s accepted features; nothing trains yet."""
        return self.step.start_training(self.log_of(server_round), accepted)

    def run_training(self, job: TrainingJob) -> None:
        """Train and compute the job's server logits (may run in another thread)."""
        self.step.run_training(job)

    def finish_training(self, job: TrainingJob) -> dict[str, float]:
        """Keep the job's server logits, take out the nodes that spoiled the
        training, fill its log and count the round's progress."""
        metrics, kept = self.step.finish_training(job)
        self.recorder.progress(job.log, bool(kept))
        return metrics

    def close_round(
        self, server_round: int, accepted: list[AcceptedReply]
    ) -> dict[str, float] | None:
        """Score the server model on the accepted test features and close the
        round's log (log line, history, ``on_round_end``, checkpoint; then
        :class:`NoProgressError` when the run has been idle too long).

        Returns the round's evaluation metrics, or None when no sample was scored.
        """
        log = self.log_of(server_round)
        self.step.score(log, accepted)
        self.logs.pop(server_round, None)
        self.recorder.close(log, self.state_dict, self.store.checkpointed)
        if log.accuracy is None or log.loss is None:
            return None
        metrics = {
            "num-examples": float(log.eval_samples),
            "accuracy": log.accuracy,
            "loss": log.loss,
        }
        if log.edge_accuracy is not None:
            metrics["edge-accuracy"] = log.edge_accuracy
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the server needs to continue after the last finished round."""
        return {
            **self.step.state_dict(),
            "rng": rng_state(),
            "sampler": self.sampler.getstate(),
            "nodes": self.registry.state(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round is ``state["round"] + 1``."""
        self.step.load_state_dict(state)
        set_rng_state(state["rng"])
        if state.get("sampler") is not None:
            self.sampler.setstate(state["sampler"])
        self.registry.restore(state.get("nodes", {}))
        self.recorder.history = list(state["history"])
        self.round_offset = int(state["round"])


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
    ) -> Self:
        """The strategy a run's config asks for: the paper's server model by name,
        Flower's sampling knobs and the engine's settings
        (:meth:`RoundEngine.settings`), the same for every face."""
        return cls(  # type: ignore[call-arg]
            ServerTrainer.from_run_config(config, num_classes),
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_train_nodes=config.min_train_nodes,
            min_evaluate_nodes=config.min_evaluate_nodes,
            min_available_nodes=config.min_available_nodes,
            query_timeout=config.query_timeout,
            on_round_end=on_round_end,
            **{**RoundEngine.settings(config, output_dir), **cls.face_settings(config)},
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
