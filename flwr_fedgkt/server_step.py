"""The server's step of a round: store the accepted features, train the server
model on the store, compute each node's server logits, score test features.

A step is three calls so that a schedule can run the middle one elsewhere
(``pipeline``: in a background thread): :meth:`ServerStep.start_training` (store;
nothing trains), :meth:`ServerStep.run_training` (train and compute logits into
a :class:`TrainingJob`; writes only the server model and the job) and
:meth:`ServerStep.finish_training` (keep the logits, take out the nodes that
spoiled the training, fill the round's log).

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codec import FeaturePayload, NodeKey, decode_features
from .privacy import Defences, ReleaseLedger, keep_probability
from .recorder import RoundLog, peak_rss_bytes
from .server import NonFiniteOutput, ServerTrainer, ServerTrainResult
from .store import FeatureStore
from .validation.reply import AcceptedReply

__all__ = ["ServerStep", "TrainingJob", "per_sample_mean"]

logger = logging.getLogger("flwr.fedgkt")

Reject = Callable[[RoundLog, int, NodeKey | None, str], None]
"""Records a rejection in a round's log: ``(log, node_id, key, reason)``."""


@dataclass
class TrainingJob:
    """One round's server training: its accepted replies and round log, and, once
    it ran, the training's result and the server logits of its nodes."""

    log: RoundLog
    accepted: list[AcceptedReply]
    cached: int = 0
    result: ServerTrainResult | None = None
    logits: dict[NodeKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    failed: dict[NodeKey, str] = field(default_factory=dict)  # non-finite server logits
    logits_seconds: float = 0.0

    @property
    def server_round(self) -> int:
        return self.log.round


def weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    """The mean of ``(value, weight)`` pairs; None when there is no weight."""
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total else None


def per_sample_mean(replies: list[AcceptedReply], metric: str) -> float | None:
    """``metric`` averaged over the samples of the replies that report it (each
    node weighted by its sample count); None when none does."""
    pairs = [(r.metrics[metric], r.payload.num_samples) for r in replies if metric in r.metrics]
    samples = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / samples) if samples else None


class ServerStep:
    """The server model, the stored features and what the server keeps per node
    key: server logits, the digest of the held training features, the newest
    test features.

    Parameters
    ----------
    trainer : ServerTrainer
        The server model with its optimizer.
    store : FeatureStore
        The nodes' training features.
    server_epochs : int
        Epochs over the store per round.
    max_staleness : int | None
        Drop a node's stored features after this many rounds without an upload.
    reject : Reject
        Records a rejection (a node taken out of the round) in a round's log.
    """

    def __init__(
        self,
        trainer: ServerTrainer,
        store: FeatureStore,
        server_epochs: int,
        max_staleness: int | None,
        reject: Reject,
    ) -> None:
        self.trainer = trainer
        self.store = store
        self.server_epochs = server_epochs
        self.max_staleness = max_staleness
        self.reject = reject
        self.server_logits: dict[NodeKey, tuple[np.ndarray, np.ndarray]] = {}
        self.held_train: dict[NodeKey, str] = {}
        # asynchronous runs: the server version each node's logits come from
        self.logit_versions: dict[NodeKey, int] = {}
        # each node's newest test features with their digest
        self.test_cache: dict[NodeKey, tuple[str, FeaturePayload]] = {}
        # what left each node: its feature releases and the defences it applied
        self.ledger = ReleaseLedger()
        self.defences: dict[NodeKey, Defences] = {}
        self.asked = Defences()  # what every node is asked to apply, at least

    # -- what the server holds per node ------------------------------------------------
    def held(self, key: NodeKey | None, training: bool) -> str:
        """The digest of the features the server holds for node key ``key`` (``""``:
        none); a node whose features have this digest sends none."""
        if key is None:
            return ""
        if training:
            return self.held_train.get(key, "") if key in self.store else ""
        cached = self.test_cache.get(key)
        return "" if cached is None else cached[0]

    def held_payload(self, key: NodeKey | None, training: bool) -> FeaturePayload | None:
        """The upload whose features the server holds for node key ``key``, if any."""
        if key is None:
            return None
        if training:
            return self.store.payload(key) if key in self.store else None
        cached = self.test_cache.get(key)
        return None if cached is None else cached[1]

    # -- training --------------------------------------------------------------------------
    def start_training(self, log: RoundLog, accepted: list[AcceptedReply]) -> TrainingJob:
        """Store the round's accepted features (and drop those past
        ``max-staleness``): the server training's input. Nothing trains yet."""
        cached = self.keep(accepted, log.round)
        self.drop_stale(log.round)
        return TrainingJob(log, accepted, cached)

    def keep(self, accepted: list[AcceptedReply], version: int) -> int:
        """Store the accepted features as of server version ``version`` (a round,
        or an asynchronous run's server epoch); the number of uploads whose
        features the store held unchanged."""
        # features kept from an earlier upload (unchanged) are not stored again
        cached = sum(self.store.put(r.key, r.payload, version) for r in accepted)
        for reply in accepted:
            if reply.digest is not None:
                self.held_train[reply.key] = reply.digest
                self.note_release(reply, "train")
                keep = self.label_keep(reply)
                if keep < 1.0:
                    self.trainer.label_keep[reply.key] = keep
                else:
                    self.trainer.label_keep.pop(reply.key, None)
        return cached

    # -- what left the nodes -------------------------------------------------------------
    def note_release(self, reply: AcceptedReply, split: str) -> None:
        """Count an upload that carried features (a release of every sample in it)
        with the noise its node says it applied."""
        if not reply.defences.covers(self.asked) and self.defences.get(reply.key) != reply.defences:
            logger.warning(
                "node key %r applies %s, less than the strategy asks for (%s)",
                reply.key,
                reply.defences.active or "no defences",
                ", ".join(self.asked.active),
            )
        self.defences[reply.key] = reply.defences
        self.ledger.record(reply.key, split, reply.defences.feature_noise)

    def label_keep(self, reply: AcceptedReply) -> float:
        """The probability that the reply's labels are the true ones (1.0 without
        randomized response)."""
        epsilon = reply.defences.label_epsilon
        return keep_probability(epsilon, self.trainer.num_classes) if epsilon > 0 else 1.0

    def privacy(self) -> dict[str, Any]:
        """The run's privacy so far, for a round's record: the defences any node
        applied, the worst node's epsilon at ``delta`` over its feature releases
        (None when a release carried no noise: no bound), the releases of the node
        that released most, and the largest label-flip probability in force."""
        worst = self.ledger.worst()
        active = sorted({name for d in self.defences.values() for name in d.active})
        flips = [1.0 - keep for keep in self.trainer.label_keep.values()]
        releases = [
            self.ledger.count(k, s) for k in self.ledger.releases for s in ("train", "test")
        ]
        return {
            "defences": active,
            "epsilon": worst if worst is not None and math.isfinite(worst) else None,
            "delta": self.ledger.delta,
            "releases_max": max(releases, default=0),
            "label_flip": max(flips, default=0.0),
        }

    def drop_stale(self, version: int) -> None:
        """Drop the features of nodes whose newest upload is more than
        ``max-staleness`` server versions older than ``version``."""
        if self.max_staleness is None:
            return
        for key in self.store.nodes():
            if version - self.store.last_round(key) > self.max_staleness:
                logger.info("dropping node key %r's features: older than max-staleness", key)
                self.store.remove(key)

    def run_training(self, job: TrainingJob) -> None:
        """Train the server model on the store and compute the server logits of the
        job's nodes (into the job, not yet sent anywhere). Reads the store and
        writes only the server model and the job, so it may run beside the
        validation of newer replies (``pipeline``)."""
        job.result = self.trainer.train(self.store, self.server_epochs)
        began = time.perf_counter()
        for reply in job.accepted:
            if reply.key in job.result.excluded:
                continue
            try:
                job.logits[reply.key] = self.trainer.logits_for(self.store, reply.key)
            except NonFiniteOutput as err:
                job.failed[reply.key] = str(err)
        job.logits_seconds = time.perf_counter() - began

    def finish_training(self, job: TrainingJob) -> tuple[dict[str, float], list[AcceptedReply]]:
        """Take the nodes that spoiled the training out, keep the new server logits
        and fill the job's round log. The round's training metrics and the replies
        kept."""
        result = job.result
        if result is None:
            raise RuntimeError(f"round {job.server_round}'s server training did not run")
        for key, reason in result.excluded.items():
            self.drop(job.log, key, reason, job.accepted)
        kept = []
        for reply in job.accepted:
            if reply.key in result.excluded:
                continue
            if reply.key in job.failed:
                self.drop(job.log, reply.key, job.failed[reply.key], [reply])
                continue
            self.server_logits[reply.key] = job.logits[reply.key]
            kept.append(reply)

        num_examples = sum(r.payload.num_samples for r in kept)
        metrics: dict[str, float] = {
            "num-examples": num_examples,
            "replies": len(kept),
            "server-train-loss": result.loss,
            "server-train-ce": result.ce,
            "server-train-kd": result.kd,
            "server-train-accuracy": result.accuracy,
            "server-train-seconds": result.seconds,
        }
        log = job.log
        for key in ("train-loss", "train-ce", "train-kd", "train-accuracy"):
            mean = per_sample_mean(kept, key)
            setattr(log, f"edge_{key.replace('-', '_')}", mean)
            if mean is not None:
                metrics[f"edge-{key}"] = mean
        log.skipped_server_steps += result.skipped_steps
        log.server_train_seconds = result.seconds
        log.server_threads = sorted(set(log.server_threads) | set(result.threads))
        log.spent("server_train", result.seconds)
        log.spent("server_logits", job.logits_seconds)
        log.server_train_loss = result.loss
        log.server_train_ce = result.ce
        log.server_train_kd = result.kd
        log.server_train_accuracy = result.accuracy
        log.train_nodes = len(kept)
        log.replies_by_node = {r.key: 1 for r in kept}
        log.train_samples = num_examples
        log.cached_feature_nodes = job.cached
        log.stored_nodes = len(self.store)
        log.stored_samples = self.store.num_samples
        log.stored_feature_bytes = self.store.nbytes
        log.server_peak_rss_bytes = peak_rss_bytes()
        return metrics, kept

    def drop(self, log: RoundLog, key: NodeKey, reason: str, accepted: list[AcceptedReply]) -> None:
        """Take node key ``key`` out of the round after its reply was accepted: its
        stored features and server logits go, and its reply counts as rejected (or,
        for features stored in an earlier round, the drop is logged)."""
        self.store.remove(key)
        self.server_logits.pop(key, None)
        for reply in accepted:
            if reply.key == key:
                self.reject(log, reply.node_id, key, reason)
                break
        else:
            logger.warning("dropped the stored features of node key %r: %s", key, reason)

    # -- evaluation --------------------------------------------------------------------------
    def score(
        self,
        log: RoundLog,
        accepted: list[AcceptedReply],
        weight_cap: Callable[[NodeKey], int | None] = lambda key: None,
    ) -> None:
        """Score the server model on the accepted test features of each node, into
        ``log``: ``node_accuracy`` per node key, their median, and the headline
        ``accuracy`` and ``loss`` over the nodes, each node weighted by its sample
        count but at most ``weight_cap(key)`` (e.g. the count the server first saw
        from it), so that no node weighs more than the server can check; the edge
        models' own scores alike. A node whose features give non-finite server
        logits is rejected; the others are scored."""
        scored: list[tuple[AcceptedReply, dict[str, float], float]] = []
        cached = 0
        for reply in accepted:
            payload = reply.payload
            try:
                scores = self.trainer.evaluate(
                    decode_features(payload.features),
                    torch.from_numpy(payload.labels),
                    self.label_keep(reply),
                )
            except NonFiniteOutput as err:
                self.reject(log, reply.node_id, reply.key, str(err))
                continue
            if reply.digest is not None:
                self.test_cache[reply.key] = (reply.digest, payload)
                self.note_release(reply, "test")
            else:
                cached += 1
            cap = weight_cap(reply.key)
            weight = float(payload.num_samples if cap is None else min(payload.num_samples, cap))
            scored.append((reply, scores, weight))
        log.accuracy = weighted_mean([(s["accuracy"], w) for _, s, w in scored])
        log.loss = weighted_mean([(s["loss"], w) for _, s, w in scored])
        log.node_accuracy = {r.key: float(s["accuracy"]) for r, s, _ in scored}
        log.accuracy_median = float(np.median(list(log.node_accuracy.values()))) if scored else None
        log.edge_accuracy = weighted_mean(
            [(r.metrics["edge-accuracy"], w) for r, _, w in scored if "edge-accuracy" in r.metrics]
        )
        log.edge_loss = weighted_mean(
            [(r.metrics["edge-loss"], w) for r, _, w in scored if "edge-loss" in r.metrics]
        )
        log.privacy = self.privacy()
        log.eval_nodes = len(scored)
        log.eval_samples = sum(r.payload.num_samples for r, _, _ in scored)
        log.cached_test_nodes = cached

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state_dict(),
            "server_logits": self.server_logits,
            "store": self.store.state_dict(),
            "held_train": dict(self.held_train),
            "logit_versions": dict(self.logit_versions),
            "releases": self.ledger.state(),
            "defences": {k: dataclasses.asdict(d) for k, d in self.defences.items()},
            "label_keep": dict(self.trainer.label_keep),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.server_logits = {str(k): v for k, v in state["server_logits"].items()}
        self.store.load_state_dict(state.get("store"))
        self.held_train = {str(k): str(v) for k, v in state.get("held_train", {}).items()}
        versions = state.get("logit_versions", {})
        self.logit_versions = {str(k): int(v) for k, v in versions.items()}
        self.ledger.load_state(state.get("releases", {}))
        self.defences = {str(k): Defences(**d) for k, d in state.get("defences", {}).items()}
        keep = state.get("label_keep", {})
        self.trainer.label_keep = {str(k): float(v) for k, v in keep.items()}
