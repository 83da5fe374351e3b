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
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .checkpoint import rng_state, set_rng_state
from .codec import NodeKey, check_dtype_name
from .compression import check_compression
from .membership import Membership
from .precision import TRAINING_PRECISIONS
from .privacy import Defences
from .recorder import RoundLog, RoundRecorder
from .registry import SampleIds
from .server import ServerTrainer, output_classes
from .server_step import ServerStep, TrainingJob
from .settings import DEFAULTS
from .store import FeatureStore
from .validation import (
    COMPRESSION_KEY,
    AcceptedReply,
    Rejection,
    ReplyReader,
    ReplyValidator,
)
from .validation.federation import FederationRange

__all__ = ["RoundEngine", "sample_size"]

# Under Flower's logger, so that the round's lines appear in Flower's log
logger = logging.getLogger("flwr.fedgkt")


NODE_PROFILE = {
    "edge-train-seconds": "node_train",
    "edge-extract-seconds": "node_extract",
    "edge-encode-seconds": "node_encode",
    "node-seconds": "node_handler",
}
"""The seconds a node reports (reply metrics) and the round profile's part each
adds to (:data:`~flwr_fedgkt.recorder.PROFILE_PARTS`)."""


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
        extractor_digest: str | None = None,
        sample_ids: SampleIds | None = None,
        defences: Defences | None = None,
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
        self.members = Membership(global_sample_ids, seed, sample_ids)
        self.registry = self.members.registry
        self.round_offset = 0  # rounds done before a resume
        self.version_offset = 0  # server versions done before a resume
        self.recorder = RoundRecorder(on_round_end, checkpoints, max_idle_rounds)
        self.step = ServerStep(trainer, store, server_epochs, max_staleness, self.recorder.reject)
        self.step.asked = Defences() if defences is None else defences
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
            connected=lambda: self.members.connected(),
            extractor_digest=extractor_digest,
        )
        self.range = FederationRange()  # the nodes' feature and logit ranges
        self.logs: dict[int, RoundLog] = {}  # the open rounds' logs
        self._latest = RoundLog(round=0)

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
    def connected(self) -> Callable[[], Collection[int]]:
        """Gives the node ids connected now (the face sets it)."""
        return self.members.connected

    @connected.setter
    def connected(self, connected: Callable[[], Collection[int]]) -> None:
        self.members.connected = connected

    @property
    def on_round_end(self) -> Callable[[dict[str, Any]], None] | None:
        """Called with each finished round's record."""
        return self.recorder.on_round_end

    @on_round_end.setter
    def on_round_end(self, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.recorder.on_round_end = callback

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

    def round_config(
        self, server_round: int, held: str = "", frozen: bool | None = None
    ) -> dict[str, Any]:
        """The settings every instruction carries: the two each reply must echo
        back, the feature shape the server takes (``16x32x32``: a node checks its
        features against it before it sends them), the round's compression,
        whether the extractor is frozen, and the digest of the features the server
        holds for the node (``held``; a node whose features have this digest
        sends none)."""
        return {
            "server-round": server_round,
            "feature-dtype": self.feature_dtype,
            "feature-shape": "x".join(map(str, self.feature_shape)),
            COMPRESSION_KEY: self.compression,
            "freeze-extractor": self.frozen(server_round) if frozen is None else frozen,
            "held-features": held,
            **self.step.asked.meta(),  # the defences every node is asked for, at least
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

    def accept(
        self,
        reply: ReplyReader,
        server_round: int,
        training: bool,
        log: RoundLog | None = None,
    ) -> AcceptedReply | None:
        """Validate one reply to an instruction of round ``server_round``
        (:meth:`ReplyValidator.check`); an accepted one binds its node key and
        notes its samples, a rejected one goes into the round's log (``log``:
        another record's) with its reason (None). Nothing a node sends raises out
        of here."""
        log = self.log_of(server_round) if log is None else log
        log.bytes_up += reply.nbytes
        began = time.perf_counter()
        checked = self.validator.check(reply, server_round, training)
        log.spent("validate", time.perf_counter() - began)
        if isinstance(checked, Rejection):
            self.recorder.reject(log, checked.node_id, checked.key, checked.reason)
            return None
        if training and checked.precision in TRAINING_PRECISIONS:  # what the node used
            log.edge_precision[checked.precision] = log.edge_precision.get(checked.precision, 0) + 1
        for metric, part in NODE_PROFILE.items():
            if metric in checked.metrics:
                log.spent(part, checked.metrics[metric])
        split = "train" if training else "test"
        moved = self.registry.commit(
            checked.key,
            checked.node_id,
            checked.payload,
            split,
            checked.digest,
            checked.proof,
            checked.sketches,
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
        """Store round ``server_round``'s accepted features (but those far outside
        the other nodes' range: :meth:`screen`); nothing trains yet."""
        log = self.log_of(server_round)
        return self.step.start_training(log, self.screen(log, accepted, "train"))

    def screen(
        self, log: RoundLog, accepted: list[AcceptedReply], split: str
    ) -> list[AcceptedReply]:
        """The accepted replies whose features and logits are within the other
        nodes' range (:class:`~flwr_fedgkt.validation.federation.FederationRange`);
        the others are rejected with their reason."""
        kept, refused = self.range.screen(accepted, split)
        for reply, reason in refused:
            self.recorder.reject(log, reply.node_id, reply.key, reason)
        return kept

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
        self,
        server_round: int,
        accepted: list[AcceptedReply],
        checkpoint: bool = True,
        screen: bool = True,
    ) -> dict[str, float] | None:
        """Score the server model on the accepted test features and close the
        round's log (log line, history, ``on_round_end``, checkpoint unless
        ``checkpoint`` is False; then
        :class:`~flwr_fedgkt.recorder.NoProgressError` when the run has been idle too long).

        Returns the round's evaluation metrics, or None when no sample was scored.
        """
        log = self.log_of(server_round)
        if screen:  # (an asynchronous run screens each test upload as it arrives)
            accepted = self.screen(log, accepted, "test")
        began = time.perf_counter()
        self.step.score(log, accepted, lambda key: self.registry.first_seen(key, "test"))
        log.spent("score", time.perf_counter() - began)
        self.logs.pop(server_round, None)
        self.recorder.close(log, self.state_dict, self.store.checkpointed, checkpoint)
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
            "sampler": self.members.sampler.getstate(),
            "nodes": self.registry.state(),
            "ranges": self.range.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round is ``state["round"] + 1``."""
        self.step.load_state_dict(state)
        set_rng_state(state["rng"])
        if state.get("sampler") is not None:
            self.members.sampler.setstate(state["sampler"])
        self.registry.restore(state.get("nodes", {}))
        self.range.load_state_dict(state.get("ranges", {}))
        self.recorder.history = list(state["history"])
        self.round_offset = int(state["round"])
        epochs = self.round_offset * self.server_epochs  # a checkpoint of rounds
        self.version_offset = int(state.get("server_version", epochs))
