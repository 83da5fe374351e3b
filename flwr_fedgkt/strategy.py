"""FedGKT as a Flower strategy on the Message API.

No weights are averaged. Each round:

1. ``configure_train`` sends every sampled node its *own* server logits (none in
   its first round) and the round's config;
2. ``aggregate_train`` validates each reply, stores the valid ones' features, trains
   the large server model on all stored features and computes fresh server logits
   for each node that replied;
3. ``configure_evaluate``/``aggregate_evaluate`` score the server model on the
   nodes' test-split features and collect the edge model's own accuracy.

A reply that fails validation is rejected with its reason (in the log and in the
round's record) and touches neither the feature store nor the server model.

Everything a round does on the server besides moving messages (validating a reply,
training the server model, scoring test features, the round's record) lives in
:class:`FedGKTBase`, which the legacy-API strategy
(:class:`flwr_fedgkt.compat.LegacyFedGKT`) shares: both faces run the same code.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .features import (
    FEATURE_DTYPES,
    MAX_FEATURE_ABS,
    MAX_LOGIT_ABS,
    FeaturePayload,
    FeatureStore,
    NodeKey,
    PayloadError,
    decode_features,
    validate_metrics,
    validate_node_key,
    validate_payload,
    validate_update,
)
from .models import FEATURE_CHANNELS
from .records import (
    CONFIG_KEY,
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    NODE_KEY,
    arrays_bytes,
    logits_record,
    record_arrays,
)
from .registry import NodeRegistry, features_digest
from .server import NonFiniteOutput, ServerTrainer

__all__ = ["FedGKT", "FedGKTBase", "AcceptedReply", "sample_size"]

RoundRecord = dict[str, Any]
# what a face reads from a reply: its meta values, its arrays, its metrics
ReplyParts = tuple[Mapping[str, Any], Mapping[str, np.ndarray], Mapping[str, Any]]


@dataclass
class AcceptedReply:
    """A reply that passed validation: who sent it, its payload, its checked metrics."""

    node_id: int
    key: NodeKey
    payload: FeaturePayload
    metrics: dict[str, float]


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """Nodes to sample out of ``num_nodes``: ``fraction`` of them, at least ``minimum``
    and at least one; none when ``fraction`` is 0."""
    if fraction == 0.0:
        return 0
    return max(int(num_nodes * fraction), minimum, 1)


# pylint: disable=too-many-instance-attributes
class FedGKTBase:
    """The server side of FedGKT, whichever Flower API carries its messages.

    Holds the server trainer, the feature store, every node's server logits and the
    rounds' records. It validates replies, trains the server model on the stored
    features, refreshes server logits, scores test features and closes each round's
    record; the strategies built on it (:class:`FedGKT` on the Message API,
    :class:`flwr_fedgkt.compat.LegacyFedGKT` on the legacy Strategy API) only turn
    Flower messages into these calls and back. Its parameters are those documented
    on :class:`FedGKT`.
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        trainer: ServerTrainer,
        server_epochs: int = 1,
        feature_dtype: str = "float32",
        feature_shape: tuple[int, int, int] = (FEATURE_CHANNELS, 32, 32),
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        on_round_end: Callable[[RoundRecord], None] | None = None,
        max_reply_bytes: int = 0,
        max_staleness: int | None = None,
        store: FeatureStore | None = None,
        checkpoint_dir: str | Path | None = None,
        freeze_extractor: bool = False,
        max_feature_abs: float = MAX_FEATURE_ABS,
        max_logit_abs: float = MAX_LOGIT_ABS,
        global_sample_ids: bool = False,
    ) -> None:
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"feature_dtype {feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}"
            )
        self.trainer = trainer
        self.server_epochs = server_epochs
        self.feature_dtype = feature_dtype
        self.feature_shape = feature_shape
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.on_round_end = on_round_end
        self.max_reply_bytes = max_reply_bytes
        self.max_staleness = max_staleness
        self.store = FeatureStore() if store is None else store
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.freeze_extractor = freeze_extractor
        self.max_feature_abs = max_feature_abs
        self.max_logit_abs = max_logit_abs
        self.registry = NodeRegistry(global_sample_ids)
        # with a frozen extractor, each node's test features, kept after its first
        # evaluation reply (training features are kept in the store)
        self.test_cache: dict[NodeKey, FeaturePayload] = {}
        self.round_offset = 0  # rounds done before a resume
        self.server_logits: dict[NodeKey, tuple[np.ndarray, np.ndarray]] = {}
        self.history: list[RoundRecord] = []
        self._round: RoundRecord = {}
        self._sampled: dict[str, list[int]] = {}  # this round's sampled nodes, by phase

    # ------------------------------------------------------------------------------
    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Sampling:")
        log(
            INFO,
            "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(
            INFO,
            "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)",
            self.min_train_nodes,
            self.min_evaluate_nodes,
        )
        log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)
        log(INFO, "\t└──> Group knowledge transfer:")
        log(
            INFO,
            "\t\t├── Server model: %s (%d params) on %s",
            self.trainer.model_name,
            self.trainer.num_parameters,
            self.trainer.device,
        )
        log(
            INFO,
            "\t\t├── Server epochs per round: %d | KD T=%.2f alpha=%.2f",
            self.server_epochs,
            self.trainer.temperature,
            self.trainer.alpha,
        )
        log(
            INFO,
            "\t\t├── Features: %s, shape %s, stored %s",
            self.feature_dtype,
            "x".join(map(str, self.feature_shape)),
            "in memory" if self.store.directory is None else f"on disk ({self.store.directory})",
        )
        log(
            INFO,
            "\t\t├── Frozen edge extractor (features uploaded once): %s",
            "yes" if self.freeze_extractor else "no",
        )
        log(
            INFO,
            "\t\t├── Max |feature|: %g | max |edge logit|: %g | global sample ids: %s",
            self.max_feature_abs,
            self.max_logit_abs,
            "yes" if self.registry.global_sample_ids else "no",
        )
        log(
            INFO,
            "\t\t└── Max reply bytes: %s | max staleness: %s | checkpoints: %s",
            self.max_reply_bytes or "unlimited",
            "unlimited" if self.max_staleness is None else f"{self.max_staleness} rounds",
            self.checkpoint_dir or "off",
        )

    # -- the round's record --------------------------------------------------------
    def _begin_round(self, server_round: int) -> None:
        """Open the record of round ``server_round`` (at the start of its training)."""
        self._round = {
            "round": server_round,
            "started": time.perf_counter(),
            "bytes_up": 0,
            "bytes_down": 0,
            "rejected_replies": [],
            "failed_nodes": [],
            "skipped_server_steps": 0,
        }

    def _record_missing(self, sampled: list[int], replied: list[int]) -> None:
        """Report sampled nodes that sent nothing back before the round's timeout."""
        for node_id in sorted(set(sampled) - set(replied)):
            self._record_failure(node_id, "no reply within the round's timeout")

    def _round_config(
        self, server_round: int, base: Mapping[str, Any], send_features: bool = True
    ) -> dict[str, Any]:
        """``base`` plus the two settings every reply must echo back, and whether the
        node must send its features (not when the server holds them already)."""
        return {
            **base,
            "server-round": server_round,
            "feature-dtype": self.feature_dtype,
            "send-features": send_features,
        }

    def _cached_payload(self, key: NodeKey | None, training: bool) -> FeaturePayload | None:
        """The upload whose features the server keeps for node key ``key``, if any:
        with a frozen edge extractor, a node's features never change, so it sends
        them once (training features live in the store, test features in
        ``test_cache``)."""
        if not self.freeze_extractor or key is None:
            return None
        if training:
            return self.store.payload(key) if key in self.store else None
        return self.test_cache.get(key)

    def _record_failure(self, node_id: int | None, reason: str | None) -> None:
        log(WARNING, "node %s failed: %s", node_id, reason)
        self._round["failed_nodes"].append({"node_id": node_id, "reason": reason})

    # -- replies -------------------------------------------------------------------
    def _connected(self) -> Collection[int]:
        """Node ids connected now (a face reads them from Flower)."""
        return ()

    def _reject(self, node_id: int, key: NodeKey | None, reason: str) -> None:
        log(WARNING, "rejected reply from node %s: %s", node_id, reason)
        self._round["rejected_replies"].append(
            {"node_id": node_id, "node_key": key, "reason": reason}
        )

    def _admit(
        self,
        node_id: int,
        nbytes: int,
        read: Callable[[], ReplyParts],
        server_round: int,
        training: bool,
    ) -> AcceptedReply | None:
        """Validate one reply and, when it is valid, record who sent it.

        ``read`` decodes the reply's parts (a face's codec). Every value is checked
        before use (:meth:`_validate`); a reply that fails is rejected with its
        reason (log and round record) and gives None. Nothing a node sends raises
        out of here.
        """
        self._round["bytes_up"] += nbytes
        key: NodeKey | None = None
        try:
            if self.max_reply_bytes and nbytes > self.max_reply_bytes:
                raise PayloadError(
                    f"reply of {nbytes} bytes exceeds max-reply-bytes ({self.max_reply_bytes})"
                )
            try:
                meta, arrays, metrics = read()
            except PayloadError:
                raise
            except Exception as err:  # a corrupt array cannot even be decoded
                raise PayloadError(f"undecodable reply: {type(err).__name__}: {err}") from None
            key = validate_node_key(meta.get(NODE_KEY))
            reply, digest = self._validate(
                node_id, key, meta, arrays, metrics, server_round, training
            )
        except PayloadError as err:
            self._reject(node_id, key, str(err))
            return None
        except Exception as err:  # a check that itself failed: still only this reply
            log(
                ERROR,
                "validating a reply from node %s failed:\n%s",
                node_id,
                traceback.format_exc(),
            )
            self._reject(node_id, key, f"could not be validated: {type(err).__name__}: {err}")
            return None
        split = "train" if training else "test"
        moved = self.registry.commit(key, node_id, reply.payload, split, digest)
        if moved is not None:
            log(INFO, "node key %r moved from node %d (gone) to node %d", key, moved, node_id)
        return reply

    def _validate(
        self,
        node_id: int,
        key: NodeKey,
        meta: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        metrics: Mapping[str, Any],
        server_round: int,
        training: bool,
    ) -> tuple[AcceptedReply, str | None]:
        """Check a reply's round, dtype, key, arrays and metrics; raise PayloadError
        naming what is wrong. Returns the reply and its features' digest (None when
        it reuses features the server holds: ``freeze-extractor``)."""
        reply_round = meta.get("server-round")
        if reply_round != server_round:
            raise PayloadError(f"reply is for round {reply_round!r}, expected {server_round}")
        dtype = meta.get("feature-dtype")
        if dtype != self.feature_dtype:
            raise PayloadError(f"feature dtype {dtype!r}, expected {self.feature_dtype!r}")
        connected = self._connected()
        self.registry.check(key, node_id, connected)
        digest = None
        if "features" not in arrays:
            cached = self._cached_payload(key, training)
            if cached is None:
                raise PayloadError("missing arrays: features (the server holds none of this node)")
            payload = validate_update(
                arrays, cached, self.trainer.num_classes, training, self.max_logit_abs
            )
        else:
            payload = validate_payload(
                arrays,
                self.feature_dtype,
                self.feature_shape,
                self.trainer.num_classes,
                require_logits=training,
                max_feature_abs=self.max_feature_abs,
                max_logit_abs=self.max_logit_abs,
            )
            digest = features_digest(payload)
        checked = validate_metrics(metrics, payload.num_samples)
        split = "train" if training else "test"
        self.registry.check(key, node_id, connected, payload, split, digest)
        return AcceptedReply(node_id, key, payload, checked), digest

    # -- training and evaluation on the server --------------------------------------
    def _drop(self, key: NodeKey, reason: str, accepted: list[AcceptedReply]) -> None:
        """Take node key ``key`` out of the round after its reply was accepted: its
        stored features and server logits go, and its reply counts as rejected (or,
        for features stored in an earlier round, the drop is logged)."""
        self.store.remove(key)
        self.server_logits.pop(key, None)
        for reply in accepted:
            if reply.key == key:
                self._reject(reply.node_id, key, reason)
                break
        else:
            log(WARNING, "dropped the stored features of node key %r: %s", key, reason)

    def _train_server(self, server_round: int, accepted: list[AcceptedReply]) -> dict[str, float]:
        """Store the accepted features, train the server model, refresh server logits.

        A node whose features make the server's training or its server logits
        non-finite is taken out of the round (:meth:`_drop`). Returns the round's
        training metrics (the strategy's aggregated metrics).
        """
        # features kept from an earlier upload (freeze-extractor) are not stored again
        cached = sum(self.store.put(r.key, r.payload, server_round) for r in accepted)
        if self.max_staleness is not None:
            for key in self.store.nodes():
                if server_round - self.store.last_round(key) > self.max_staleness:
                    log(INFO, "dropping node key %r's features: older than max-staleness", key)
                    self.store.remove(key)

        result = self.trainer.train(self.store, self.server_epochs)
        for key, reason in result.excluded.items():
            self._drop(key, reason, accepted)
        accepted = [r for r in accepted if r.key not in result.excluded]
        kept = []
        for reply in accepted:
            try:
                self.server_logits[reply.key] = self.trainer.logits_for(self.store, reply.key)
            except NonFiniteOutput as err:
                self._drop(reply.key, str(err), [reply])
                continue
            kept.append(reply)
        accepted = kept

        num_examples = sum(r.payload.num_samples for r in accepted)
        metrics: dict[str, float] = {
            "num-examples": num_examples,
            "replies": len(accepted),
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-seconds": result.seconds,
        }
        for key in ("train_loss", "train_accuracy"):
            mean = _per_sample_mean(accepted, key)
            if mean is not None:
                metrics[f"edge-{key.replace('_', '-')}"] = mean
        self._round["skipped_server_steps"] += result.skipped_steps
        self._round.update(
            {
                "server_train_seconds": result.seconds,
                "server_train_loss": result.loss,
                "server_train_accuracy": result.accuracy,
                "train_nodes": len(accepted),
                "train_samples": num_examples,
                "cached_feature_nodes": cached,
                "stored_nodes": len(self.store),
                "stored_samples": self.store.num_samples,
                "stored_feature_bytes": self.store.nbytes,
                "server_peak_rss_bytes": peak_rss_bytes(),
            }
        )
        return metrics

    def _close_round(
        self, server_round: int, accepted: list[AcceptedReply]
    ) -> dict[str, float] | None:
        """Score the server model on the accepted test features, average the edge
        model's own scores per sample, and close the round's record (log, history,
        callback). A node whose features give non-finite server logits is rejected;
        the others are scored.

        Returns the round's evaluation metrics, or None when no sample was scored.
        """
        correct, loss_sum, total = 0.0, 0.0, 0
        scored = []
        for reply in accepted:
            payload = reply.payload
            try:
                scores = self.trainer.evaluate(
                    decode_features(payload.features), torch.from_numpy(payload.labels)
                )
            except NonFiniteOutput as err:
                self._reject(reply.node_id, reply.key, str(err))
                continue
            if self.freeze_extractor:
                self.test_cache[reply.key] = payload
            n = payload.num_samples
            correct += scores["accuracy"] * n
            loss_sum += scores["loss"] * n
            total += n
            scored.append(reply)

        record = self._round
        record.update(
            {
                "accuracy": correct / total if total else None,
                "loss": loss_sum / total if total else None,
                "edge_accuracy": _per_sample_mean(scored, "edge_accuracy"),
                "edge_loss": _per_sample_mean(scored, "edge_loss"),
                "eval_nodes": len(scored),
                "eval_samples": total,
            }
        )
        record["seconds"] = time.perf_counter() - record.pop("started", time.perf_counter())
        self.history.append(record)
        log(
            INFO,
            "round %d: accuracy %s | edge accuracy %s | up %.2f MB | down %.2f MB | "
            "server train %.1fs | round %.1fs | rejected %d",
            server_round,
            _fmt(record["accuracy"]),
            _fmt(record["edge_accuracy"]),
            record["bytes_up"] / 1e6,
            record["bytes_down"] / 1e6,
            record.get("server_train_seconds", 0.0),
            record["seconds"],
            len(record["rejected_replies"]),
        )
        if self.on_round_end is not None:
            self.on_round_end(record)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, server_round, self.checkpoint_state())
        if not total:
            return None
        metrics = {"num-examples": total, "accuracy": record["accuracy"], "loss": record["loss"]}
        if record["edge_accuracy"] is not None:
            metrics["edge-accuracy"] = record["edge_accuracy"]
        return metrics

    # -- checkpoints ----------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything the server needs to continue after the last finished round."""
        trainer = self.trainer
        return {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": None if trainer.scheduler is None else trainer.scheduler.state_dict(),
            "plateau": None if trainer.plateau is None else trainer.plateau.state_dict(),
            "generator": trainer.generator.get_state(),
            "rng": rng_state(),
            "server_logits": self.server_logits,
            "nodes": self.registry.state(),
            "history": self.history,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the next round is ``state["round"] + 1``."""
        trainer = self.trainer
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scheduler is not None and state.get("scheduler") is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        if trainer.plateau is not None and state.get("plateau") is not None:
            trainer.plateau.load_state_dict(state["plateau"])
        trainer.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        self.server_logits = {str(k): v for k, v in state["server_logits"].items()}
        self.registry.restore(state.get("nodes", {}))
        self.history = list(state["history"])
        self.round_offset = int(state["round"])


class FedGKT(FedGKTBase, Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) as a Flower strategy.

    Implementation based on https://arxiv.org/abs/2007.14513

    Parameters
    ----------
    trainer : ServerTrainer
        The server-side large model with its optimizer; trained inside
        ``aggregate_train``.
    server_epochs : int (default: 1)
        Epochs of server training per round over all stored features.
    feature_dtype : str (default: "float32")
        Wire dtype the clients encode features in: float32, float16, bfloat16, int8.
    feature_shape : tuple[int, int, int] (default: (16, 32, 32))
        Shape of one sample's features; replies with another shape are rejected.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before a round starts.
    on_round_end : Callable[[dict], None] | None (default: None)
        Called with each round's record once the round's evaluation is done (the
        ServerApp writes ``results.json`` there).
    max_reply_bytes : int (default: 0)
        Replies whose ArrayRecords exceed this many bytes are rejected; 0: no limit.
    max_staleness : int | None (default: None)
        Train on the stored features of every node seen within this many rounds
        (stale ones included); older ones are dropped. None: keep them all.
    store : FeatureStore | None (default: None)
        Where features are kept; a new in-memory store when None (pass
        ``FeatureStore(directory)`` for memory-mapped files).
    checkpoint_dir : str | Path | None (default: None)
        Where a checkpoint is written atomically after every round; None: none.
    freeze_extractor : bool (default: False)
        The clients keep their edge extractor fixed (``freeze-extractor``), so their
        features never change: a node uploads them the first time it takes part,
        the server keeps them (training features in ``store``, test features in
        memory) and later replies carry only sample ids and logits. A node whose
        features were dropped (``max_staleness``) is asked for them again.
    max_feature_abs : float (default: 1e4)
        Bound on the magnitude of a decoded feature value; replies beyond it are
        rejected. Far above the ResNet-8 stem's activations on normalised images
        (below 7 measured); raise it for models whose features are larger.
    max_logit_abs : float (default: 1e4)
        Bound on the magnitude of an edge logit; replies beyond it are rejected.
    global_sample_ids : bool (default: False)
        Sample ids are unique across all nodes (as in the built-in data sets): a
        sample id that one node key holds cannot be uploaded under another. Leave
        False when each node numbers its own samples.

    Every reply names its node's stable key in its ``meta`` record
    (``node-key``); the server keeps features, server logits and staleness per
    key, so a node that reconnects under a new Flower node id continues where
    it was (see :class:`flwr_fedgkt.registry.NodeRegistry`).
    """

    _grid: Grid | None = None

    def _connected(self) -> Collection[int]:
        return () if self._grid is None else set(self._grid.get_node_ids())

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        self._grid = grid
        size = sample_size(len(list(grid.get_node_ids())), fraction, minimum)
        if size == 0:
            return []
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, size)
        return sorted(node_ids)

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One Message per sampled node, each carrying that node's own server logits."""
        server_round += self.round_offset
        self._begin_round(server_round)
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self._sampled["train"] = node_ids
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        messages = []
        for node_id in node_ids:
            key = self.registry.key_of(node_id)
            send = self._cached_payload(key, training=True) is None
            round_config = ConfigRecord(self._round_config(server_round, config, send))
            content = RecordDict({CONFIG_KEY: round_config})
            if key is not None and key in self.server_logits:
                ids, logits = self.server_logits[key]
                content[LOGITS_KEY] = logits_record(ids, logits)
            self._round["bytes_down"] += arrays_bytes(content)
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        return messages

    @staticmethod
    def _read(msg: Message) -> ReplyParts:
        """A reply's meta values, arrays and metrics (the uploaded features as views
        of the message's bytes); PayloadError when a record is missing.

        Records and arrays other than those in :mod:`flwr_fedgkt.records` are ignored.
        """
        content = msg.content
        if FEATURES_KEY not in content.array_records:
            raise PayloadError(f"missing ArrayRecord {FEATURES_KEY!r}")
        if META_KEY not in content.config_records:
            raise PayloadError(f"missing ConfigRecord {META_KEY!r}")
        if METRICS_KEY not in content.metric_records:
            raise PayloadError(f"missing MetricRecord {METRICS_KEY!r}")
        arrays = record_arrays(content.array_records[FEATURES_KEY], views=("features",))
        return content.config_records[META_KEY], arrays, content.metric_records[METRICS_KEY]

    def _triage(
        self, replies: Iterable[Message], server_round: int, training: bool
    ) -> list[AcceptedReply]:
        """Split replies into valid ones and rejected/failed ones (recorded)."""
        accepted = []
        replies = list(replies)
        sampled = self._sampled.get("train" if training else "evaluate", [])
        self._record_missing(sampled, [msg.metadata.src_node_id for msg in replies])
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                self._record_failure(node_id, msg.error.reason)
                continue
            reply = self._admit(
                node_id,
                arrays_bytes(msg.content),
                partial(self._read, msg),
                server_round,
                training,
            )
            if reply is not None:
                accepted.append(reply)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store the features, train the server model, refresh logits."""
        server_round += self.round_offset
        accepted = self._triage(replies, server_round, training=True)
        metrics = self._train_server(server_round, accepted)
        return None, MetricRecord({k: v for k, v in metrics.items()})

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the features of their test split."""
        server_round += self.round_offset
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self._sampled["evaluate"] = node_ids
        messages = []
        for node_id in node_ids:
            send = self._cached_payload(self.registry.key_of(node_id), training=False) is None
            round_config = ConfigRecord(self._round_config(server_round, config, send))
            messages.append(
                Message(
                    content=RecordDict({CONFIG_KEY: round_config}),
                    message_type=MessageType.EVALUATE,
                    dst_node_id=node_id,
                )
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Score the server model on the test features; report edge accuracy too."""
        server_round += self.round_offset
        accepted = self._triage(replies, server_round, training=False)
        metrics = self._close_round(server_round, accepted)
        return None if metrics is None else MetricRecord({k: v for k, v in metrics.items()})


def peak_rss_bytes() -> int:
    """Peak resident memory of this (server) process so far."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _per_sample_mean(replies: list[AcceptedReply], metric: str) -> float | None:
    """``metric`` averaged over the samples of the replies that report it (each
    node weighted by its sample count); None when none does."""
    pairs = [(r.metrics[metric], r.payload.num_samples) for r in replies if metric in r.metrics]
    samples = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / samples) if samples else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
