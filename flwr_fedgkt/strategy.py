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
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from logging import INFO, WARNING
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
    FeaturePayload,
    FeatureStore,
    PayloadError,
    decode_features,
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
    arrays_bytes,
    logits_record,
    record_arrays,
)
from .server import ServerTrainer

__all__ = ["FedGKT", "FedGKTBase", "AcceptedReply", "sample_size"]

RoundRecord = dict[str, Any]
# a reply that passed validation: the node, its payload and its numeric metrics
AcceptedReply = tuple[int, FeaturePayload, dict[str, float]]


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
        # with a frozen extractor, each node's test features, kept after its first
        # evaluation reply (training features are kept in the store)
        self.test_cache: dict[int, FeaturePayload] = {}
        self.round_offset = 0  # rounds done before a resume
        self.server_logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
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

    def _cached_payload(self, node_id: int, training: bool) -> FeaturePayload | None:
        """The upload whose features the server keeps for ``node_id``, if any: with a
        frozen edge extractor, a node's features never change, so it sends them once
        (training features live in the store, test features in ``test_cache``)."""
        if not self.freeze_extractor:
            return None
        if training:
            return self.store.payload(node_id) if node_id in self.store else None
        return self.test_cache.get(node_id)

    def _record_failure(self, node_id: int | None, reason: str | None) -> None:
        log(WARNING, "node %s failed: %s", node_id, reason)
        self._round["failed_nodes"].append({"node_id": node_id, "reason": reason})

    # -- replies -------------------------------------------------------------------
    def _validate_reply(
        self,
        meta: Mapping[str, Any],
        arrays: Callable[[], Mapping[str, np.ndarray]],
        server_round: int,
        require_logits: bool,
        node_id: int | None = None,
    ) -> FeaturePayload:
        """Check a reply's round and dtype, then decode (``arrays()``) and validate its
        arrays; raise PayloadError naming what is wrong.

        A reply without features from a node whose features the server keeps
        (``freeze-extractor``; ``node_id`` given) is checked against them instead.
        """
        reply_round = meta.get("server-round")
        if reply_round != server_round:
            raise PayloadError(f"reply is for round {reply_round!r}, expected {server_round}")
        dtype = meta.get("feature-dtype")
        if dtype != self.feature_dtype:
            raise PayloadError(f"feature dtype {dtype!r}, expected {self.feature_dtype!r}")
        try:
            decoded = arrays()
        except PayloadError:
            raise
        except Exception as err:  # a corrupt array cannot even be decoded
            raise PayloadError(f"undecodable arrays: {err}") from None
        if "features" not in decoded and node_id is not None:
            cached = self._cached_payload(node_id, training=require_logits)
            if cached is None:
                raise PayloadError("missing arrays: features (the server holds none of this node)")
            return validate_update(decoded, cached, self.trainer.num_classes, require_logits)
        return validate_payload(
            decoded,
            self.feature_dtype,
            self.feature_shape,
            self.trainer.num_classes,
            require_logits=require_logits,
        )

    def _accept_reply(
        self, node_id: int, nbytes: int, validate: Callable[[], FeaturePayload]
    ) -> FeaturePayload | None:
        """Count a reply's ``nbytes`` and validate it; a PayloadError rejects it (its
        reason goes to the log and the round's record) and gives None."""
        self._round["bytes_up"] += nbytes
        try:
            if self.max_reply_bytes and nbytes > self.max_reply_bytes:
                raise PayloadError(
                    f"reply of {nbytes} bytes exceeds max-reply-bytes ({self.max_reply_bytes})"
                )
            return validate()
        except PayloadError as err:
            log(WARNING, "rejected reply from node %d: %s", node_id, err)
            self._round["rejected_replies"].append({"node_id": node_id, "reason": str(err)})
            return None

    # -- training and evaluation on the server --------------------------------------
    def _train_server(self, server_round: int, accepted: list[AcceptedReply]) -> dict[str, float]:
        """Store the accepted features, train the server model, refresh server logits.

        Returns the round's training metrics (the strategy's aggregated metrics).
        """
        # features kept from an earlier upload (freeze-extractor) are not stored again
        cached = sum(
            self.store.put(node_id, payload, server_round) for node_id, payload, _ in accepted
        )
        if self.max_staleness is not None:
            for node_id in self.store.nodes():
                if server_round - self.store.last_round(node_id) > self.max_staleness:
                    log(INFO, "dropping node %d's features: older than max-staleness", node_id)
                    self.store.remove(node_id)

        result = self.trainer.train(self.store, self.server_epochs)
        for node_id, _, _ in accepted:
            self.server_logits[node_id] = self.trainer.logits_for(self.store, node_id)

        num_examples = sum(p.num_samples for _, p, _ in accepted)
        metrics: dict[str, float] = {
            "num-examples": num_examples,
            "replies": len(accepted),
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-seconds": result.seconds,
        }
        if num_examples:
            for key in ("train_loss", "train_accuracy"):
                values = [(m[key], p.num_samples) for _, p, m in accepted if key in m]
                if values:
                    metrics[f"edge-{key.replace('_', '-')}"] = float(
                        sum(v * n for v, n in values) / sum(n for _, n in values)
                    )
        self._round.update(
            {
                "server_train_seconds": result.seconds,
                "server_train_loss": result.loss,
                "server_train_accuracy": result.accuracy,
                "train_nodes": len(accepted),
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
        model's own scores, and close the round's record (log, history, callback).

        Returns the round's evaluation metrics, or None when no sample was scored.
        """
        correct, loss_sum, total = 0.0, 0.0, 0
        edge_correct, edge_loss = 0.0, 0.0
        for node_id, payload, metrics in accepted:
            if self.freeze_extractor:
                self.test_cache[node_id] = payload
            scores = self.trainer.evaluate(
                decode_features(payload.features), torch.from_numpy(payload.labels)
            )
            n = payload.num_samples
            correct += scores["accuracy"] * n
            loss_sum += scores["loss"] * n
            edge_correct += metrics.get("edge_accuracy", 0.0) * n
            edge_loss += metrics.get("edge_loss", 0.0) * n
            total += n

        record = self._round
        record.update(
            {
                "accuracy": correct / total if total else None,
                "loss": loss_sum / total if total else None,
                "edge_accuracy": edge_correct / total if total else None,
                "edge_loss": edge_loss / total if total else None,
                "eval_nodes": len(accepted),
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
        return {
            "num-examples": total,
            "accuracy": record["accuracy"],
            "loss": record["loss"],
            "edge-accuracy": record["edge_accuracy"],
        }

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
        self.server_logits = dict(state["server_logits"])
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
    """

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
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
            send = self._cached_payload(node_id, training=True) is None
            round_config = ConfigRecord(self._round_config(server_round, config, send))
            content = RecordDict({CONFIG_KEY: round_config})
            if node_id in self.server_logits:
                ids, logits = self.server_logits[node_id]
                content[LOGITS_KEY] = logits_record(ids, logits)
            self._round["bytes_down"] += arrays_bytes(content)
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        return messages

    def _decode(self, msg: Message, server_round: int, require_logits: bool) -> FeaturePayload:
        """Validate one reply; raise PayloadError naming what is wrong."""
        content = msg.content
        if FEATURES_KEY not in content.array_records:
            raise PayloadError(f"missing ArrayRecord {FEATURES_KEY!r}")
        if META_KEY not in content.config_records:
            raise PayloadError(f"missing ConfigRecord {META_KEY!r}")
        if METRICS_KEY not in content.metric_records:
            raise PayloadError(f"missing MetricRecord {METRICS_KEY!r}")
        return self._validate_reply(
            content.config_records[META_KEY],
            partial(record_arrays, content.array_records[FEATURES_KEY], views=("features",)),
            server_round,
            require_logits,
            msg.metadata.src_node_id,
        )

    def _triage(
        self, replies: Iterable[Message], server_round: int, require_logits: bool
    ) -> list[AcceptedReply]:
        """Split replies into valid payloads and rejected/failed ones (recorded)."""
        accepted = []
        replies = list(replies)
        sampled = self._sampled.get("train" if require_logits else "evaluate", [])
        self._record_missing(sampled, [msg.metadata.src_node_id for msg in replies])
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                self._record_failure(node_id, msg.error.reason)
                continue
            payload = self._accept_reply(
                node_id,
                arrays_bytes(msg.content),
                partial(self._decode, msg, server_round, require_logits),
            )
            if payload is None:
                continue
            metrics = msg.content.metric_records.get(METRICS_KEY, MetricRecord())
            accepted.append((node_id, payload, {k: float(v) for k, v in metrics.items()}))  # type: ignore[arg-type]
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store the features, train the server model, refresh logits."""
        server_round += self.round_offset
        accepted = self._triage(replies, server_round, require_logits=True)
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
            send = self._cached_payload(node_id, training=False) is None
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
        accepted = self._triage(replies, server_round, require_logits=False)
        metrics = self._close_round(server_round, accepted)
        return None if metrics is None else MetricRecord({k: v for k, v in metrics.items()})


def peak_rss_bytes() -> int:
    """Peak resident memory of this (server) process so far."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
