"""The server's side of a FedGKT round, without Flower.

:class:`RoundEngine` is what both Flower faces (:class:`flwr_fedgkt.strategy.FedGKT`
on the Message API, :class:`flwr_fedgkt.compat.LegacyFedGKT` on the legacy API)
and :func:`flwr_fedgkt.local.run_local` hold and drive. A round, as calls:

1. :meth:`~RoundEngine.begin_round` opens the round's :class:`RoundLog`;
   :meth:`~RoundEngine.sample` picks nodes (seeded) and
   :meth:`~RoundEngine.instructions` gives each its own server logits;
2. :meth:`~RoundEngine.accept` takes one reply (a :class:`ReplyReader`: the face's
   decoding of a Flower reply) through size check, decoding, validation and the
   node-key and ownership checks, in that order, with every error caught in one
   place: a bad reply is rejected with its reason and changes nothing;
3. :meth:`~RoundEngine.train_round` stores the accepted features, trains the
   server model on all stored features and computes each node's server logits;
4. :meth:`~RoundEngine.close_round` scores the server model on the accepted test
   features, closes the round's log (``on_round_end``, checkpoint) and returns the
   evaluation metrics.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import random
import re
import resource
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

import numpy as np
import torch
from torch import nn

from .checkpoint import rng_state, save_checkpoint, set_rng_state
from .compression import check_compression, inflate
from .config import RunConfig
from .features import (
    MAX_FEATURE_ABS,
    MAX_LOGIT_ABS,
    FeaturePayload,
    FeatureStore,
    NodeKey,
    PayloadError,
    check_dtype_name,
    decode_features,
    validate_metrics,
    validate_node_key,
    validate_payload,
    validate_update,
    wire_dtype,
)
from .precision import TRAINING_PRECISIONS
from .registry import NodeRegistry, features_digest
from .server import NonFiniteOutput, ServerTrainer, ServerTrainResult, output_classes

__all__ = [
    "AcceptedReply",
    "HoldsEngine",
    "ReplyParts",
    "ReplyReader",
    "RoundEngine",
    "RoundLog",
    "sample_size",
]

# Under Flower's logger, so that the round's lines appear in Flower's log
logger = logging.getLogger("flwr.fedgkt")

NODE_KEY = "node-key"
"""The meta entry in which a reply names its node's stable key."""
PRECISION_KEY = "precision"
"""The meta entry in which a training reply names the precision it trained in."""
COMPRESSION_KEY = "compression"
"""The meta entry in which a reply names the codec of its feature bytes
(``none`` when absent); also the round config's entry naming the round's codec."""

ReplyParts = tuple[Mapping[str, Any], Mapping[str, np.ndarray], Mapping[str, Any]]
"""What a reply holds: its meta values, its arrays by name, its metrics."""


class ReplyReader(Protocol):
    """One node's reply as a Flower face received it."""

    node_id: int
    nbytes: int  # bytes of its arrays, as Flower counts them

    def read(self) -> ReplyParts:
        """Decode the reply; raise (anything) when it cannot be decoded."""
        ...


@dataclass
class AcceptedReply:
    """A reply that passed validation: who sent it, its payload, its checked metrics."""

    node_id: int
    key: NodeKey
    payload: FeaturePayload
    metrics: dict[str, float]
    digest: str | None = None  # of the features it sent; None: it sent none (unchanged)


@dataclass
class TrainingJob:
    """One round's server training: its accepted replies and round log, and, once
    it ran, the training's result and the server logits of its nodes."""

    server_round: int
    accepted: list[AcceptedReply]
    log: RoundLog
    cached: int = 0
    result: ServerTrainResult | None = None
    logits: dict[NodeKey, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    failed: dict[NodeKey, str] = field(default_factory=dict)  # non-finite server logits


@dataclass
class RoundLog:
    """One round's record, as written to ``results.json`` (:meth:`to_dict`)."""

    round: int
    bytes_up: int = 0
    bytes_down: int = 0
    cumulative_bytes_up: int = 0
    cumulative_bytes_down: int = 0
    rejected_replies: list[dict[str, Any]] = field(default_factory=list)
    failed_nodes: list[dict[str, Any]] = field(default_factory=list)
    skipped_server_steps: int = 0
    server_train_seconds: float = 0.0
    server_train_loss: float | None = None
    server_train_ce: float | None = None
    server_train_kd: float | None = None
    server_train_accuracy: float | None = None
    edge_train_loss: float | None = None
    edge_train_ce: float | None = None
    edge_train_kd: float | None = None
    edge_train_accuracy: float | None = None
    edge_precision: dict[str, int] = field(default_factory=dict)
    train_nodes: int = 0
    train_samples: int = 0
    cached_feature_nodes: int = 0
    cached_test_nodes: int = 0
    stored_nodes: int = 0
    stored_samples: int = 0
    stored_feature_bytes: int = 0
    server_peak_rss_bytes: int = 0
    accuracy: float | None = None
    loss: float | None = None
    edge_accuracy: float | None = None
    edge_loss: float | None = None
    eval_nodes: int = 0
    eval_samples: int = 0
    seconds: float = 0.0
    ended_seconds: float = 0.0  # since this process began its first round
    started: float = field(default_factory=time.perf_counter, repr=False)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["started"]
        return record


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """Nodes to sample out of ``num_nodes``: ``fraction`` of them, at least ``minimum``
    and at least one; none when ``fraction`` is 0."""
    if fraction == 0.0:
        return 0
    return max(int(num_nodes * fraction), minimum, 1)


def peak_rss_bytes() -> int:
    """Peak resident memory of this (server) process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Timeout)\w*): (.+)$"
)
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
MAX_REASON_CHARS = 300


class NoProgressError(RuntimeError):
    """No node replied usefully in ``max_idle_rounds`` rounds in a row: the run
    stops (the built-in ServerApp records ``"status": "no-progress"``)."""

    def __init__(self, rounds: int, reasons: Mapping[str, int]) -> None:
        self.rounds = rounds
        self.reasons = dict(reasons)
        super().__init__(
            f"no node replied usefully in {rounds} rounds in a row: {counted(self.reasons)}"
        )


def counted(reasons: Mapping[str, int]) -> str:
    """Reasons with their counts, in one line: ``2x RuntimeError: ...; 1x ...``."""
    return "; ".join(f"{n}x {reason}" for reason, n in reasons.items())


def idle_reasons(log: RoundLog) -> dict[str, int]:
    """The distinct reasons of a round's failures and rejections, with their counts."""
    counts: dict[str, int] = {}
    for entry in [*log.failed_nodes, *log.rejected_replies]:
        reason = str(entry["reason"])
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def failure_line(reason: str | None) -> str:
    """One readable line for why a node failed: the exception that the ClientApp
    raised (``RuntimeError: ...``), found in the text Flower reports (which may wrap
    it in a Ray actor's repr, a doubled traceback and terminal colour codes); else
    the text's last line. At most :data:`MAX_REASON_CHARS` characters."""
    if not reason:
        return "unknown error"
    text = _ANSI.sub("", reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [
        m.group(0)
        for line in lines
        if (m := _EXCEPTION_LINE.match(line)) and not m.group(1).endswith(_WRAPPERS)
    ]
    line = raised[0] if raised else (lines[-1] if lines else "unknown error")
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


# pylint: disable=too-many-instance-attributes
class RoundEngine:
    """The server side of FedGKT: server trainer, feature store, node keys, every
    node's server logits and the rounds' logs. Its parameters are documented on
    :class:`flwr_fedgkt.strategy.FedGKT`, which holds one."""

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        trainer: ServerTrainer | nn.Module,
        *,
        server_epochs: int = 1,
        feature_dtype: str = "float32",
        feature_shape: tuple[int, ...] | None = None,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        max_reply_bytes: int = 0,
        max_staleness: int | None = None,
        store: FeatureStore | None = None,
        checkpoint_dir: str | Path | None = None,
        freeze_extractor: bool = False,
        freeze_after: int | None = None,
        compression: str = "zstd",
        max_feature_abs: float = MAX_FEATURE_ABS,
        max_logit_abs: float = MAX_LOGIT_ABS,
        global_sample_ids: bool = False,
        seed: int = 0,
        max_idle_rounds: int = 3,
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
        self.trainer = trainer
        self.server_epochs = server_epochs
        self.feature_dtype = feature_dtype
        self.feature_shape = tuple(feature_shape)
        self.on_round_end = on_round_end
        self.max_reply_bytes = max_reply_bytes
        self.max_staleness = max_staleness
        self.store = FeatureStore() if store is None else store
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        # a replaced upload's files stay while a kept checkpoint may name them
        self.store.keep_retired = self.checkpoint_dir is not None
        self.freeze_extractor = freeze_extractor
        self.freeze_after = 0 if freeze_extractor else freeze_after
        self.compression = compression
        self.max_feature_abs = max_feature_abs
        self.max_logit_abs = max_logit_abs
        self.registry = NodeRegistry(global_sample_ids)
        self.sampler = random.Random(seed)
        self.max_idle_rounds = max_idle_rounds
        self.idle_rounds = 0  # rounds in a row in which no node replied usefully
        self.idle_reasons: dict[str, int] = {}
        self.keyless: set[int] = set()  # nodes that could not say their key
        # each node's newest test features with their digest (training features
        # live in the store, their digests in held_train): a node whose features
        # have not changed sends none
        self.test_cache: dict[NodeKey, tuple[str, FeaturePayload]] = {}
        self.held_train: dict[NodeKey, str] = {}
        self.round_offset = 0  # rounds done before a resume
        self.server_logits: dict[NodeKey, tuple[np.ndarray, np.ndarray]] = {}
        self.history: list[dict[str, Any]] = []
        self.current = RoundLog(round=0)
        self.began: float | None = None  # when this process began its first round
        self.connected: Callable[[], Collection[int]] = tuple

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
            "global_sample_ids": True,
            "seed": config.seed,
            "max_idle_rounds": config.max_idle_rounds,
        }

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
            self.server_epochs,
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
            self.max_logit_abs,
            "yes" if self.registry.global_sample_ids else "no",
        )
        logger.info(
            "\t\t└── Max reply bytes: %s | max staleness: %s | checkpoints: %s",
            self.max_reply_bytes or "unlimited",
            "unlimited" if self.max_staleness is None else f"{self.max_staleness} rounds",
            self.checkpoint_dir or "off",
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
        if self.began is None:
            self.began = time.perf_counter()
        self.current = RoundLog(round=server_round)
        return self.current

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
        held = self._held(key, training)
        logits = self.server_logits.get(key) if training and key is not None else None
        return held, logits

    def _held(self, key: NodeKey | None, training: bool) -> str:
        """The digest of the features the server holds for node key ``key``."""
        if key is None:
            return ""
        if training:
            return self.held_train.get(key, "") if key in self.store else ""
        cached = self.test_cache.get(key)
        return "" if cached is None else cached[0]

    def _cached_payload(self, key: NodeKey | None, training: bool) -> FeaturePayload | None:
        """The upload whose features the server holds for node key ``key``, if any
        (training features live in the store, test features in ``test_cache``)."""
        if key is None:
            return None
        if training:
            return self.store.payload(key) if key in self.store else None
        cached = self.test_cache.get(key)
        return None if cached is None else cached[1]

    # -- replies ---------------------------------------------------------------------------
    def record_failure(self, node_id: int | None, reason: str | None) -> None:
        """A node whose ClientApp raised or that did not reply in time: the round's
        log gets the reason in one line (:func:`failure_line`), the log the whole
        text once."""
        line = failure_line(reason)
        text = _ANSI.sub("", reason or "")
        if text.strip() != line:
            logger.warning("node %s failed: %s\n%s", node_id, line, text)
        else:
            logger.warning("node %s failed: %s", node_id, line)
        self.current.failed_nodes.append({"node_id": node_id, "reason": line})

    def record_missing(self, sampled: Collection[int], replied: Collection[int]) -> None:
        """Report sampled nodes that sent nothing back before the round's timeout."""
        for node_id in sorted(set(sampled) - set(replied)):
            self.record_failure(node_id, "no reply within the round's timeout")

    def reject(self, node_id: int, key: NodeKey | None, reason: str) -> None:
        logger.warning("rejected reply from node %s: %s", node_id, reason)
        self.current.rejected_replies.append(
            {"node_id": node_id, "node_key": key, "reason": reason}
        )

    def accept(self, reply: ReplyReader, server_round: int, training: bool) -> AcceptedReply | None:
        """Size check, decode, validate, check the node key and sample ownership,
        then record who sent the reply. Every error is caught here: a reply that
        fails is rejected with its reason (log and round log) and gives None.
        Nothing a node sends raises out of here."""
        node_id = reply.node_id
        self.current.bytes_up += reply.nbytes
        key: NodeKey | None = None
        try:
            if self.max_reply_bytes and reply.nbytes > self.max_reply_bytes:
                raise PayloadError(
                    f"reply of {reply.nbytes} bytes exceeds max-reply-bytes "
                    f"({self.max_reply_bytes})"
                )
            try:
                meta, arrays, metrics = reply.read()
            except PayloadError:
                raise
            except Exception as err:  # a corrupt array cannot even be decoded
                raise PayloadError(f"undecodable reply: {type(err).__name__}: {err}") from None
            key = validate_node_key(meta.get(NODE_KEY))
            accepted, digest = self._validate(
                node_id, key, meta, arrays, metrics, server_round, training
            )
            accepted.digest = digest
        except PayloadError as err:
            self.reject(node_id, key, str(err))
            return None
        except Exception as err:  # a check that itself failed: still only this reply
            logger.error("validating node %s's reply failed:\n%s", node_id, traceback.format_exc())
            self.reject(node_id, key, f"could not be validated: {type(err).__name__}: {err}")
            return None
        split = "train" if training else "test"
        precision = meta.get(PRECISION_KEY)
        if training and precision in TRAINING_PRECISIONS:  # what the node says it used
            self.current.edge_precision[precision] = (
                self.current.edge_precision.get(precision, 0) + 1
            )
        moved = self.registry.commit(key, node_id, accepted.payload, split, digest)
        if moved is not None:
            logger.info("node key %r moved from node %d (gone) to node %d", key, moved, node_id)
        return accepted

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
        self.registry.check_binding(key, node_id, self.connected())
        codec = meta.get(COMPRESSION_KEY, "none")
        if codec not in ("none", self.compression):
            raise PayloadError(f"compression {codec!r}, the round uses {self.compression!r}")
        digest = None
        if "features" in arrays and codec != "none":
            arrays = {**arrays, "features": self._inflate(arrays, str(codec))}
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
        self.registry.check_claims(key, payload, "train" if training else "test", digest)
        return AcceptedReply(node_id, key, payload, checked), digest

    def _inflate(self, arrays: Mapping[str, np.ndarray], codec: str) -> np.ndarray:
        """The compressed ``features`` of a reply, inflated to ``N x feature shape``
        in the wire dtype, ``N`` from its ids. The bound is checked before
        anything is inflated (:func:`~flwr_fedgkt.compression.inflate`), and it
        is at most ``max-reply-bytes`` when that is set, as for uncompressed
        replies."""
        ids = arrays.get("ids")
        if ids is None or ids.ndim != 1:
            raise PayloadError("compressed features need 1-D ids (they give their count)")
        dtype = wire_dtype(self.feature_dtype)
        expected = len(ids) * int(np.prod(self.feature_shape)) * dtype.itemsize
        if self.max_reply_bytes and expected > self.max_reply_bytes:
            raise PayloadError(
                f"compressed features of {len(ids)} samples would inflate to {expected} "
                f"bytes, beyond max-reply-bytes ({self.max_reply_bytes}); not inflated"
            )
        raw = inflate(arrays["features"], codec, expected)
        return np.frombuffer(raw, dtype=dtype).reshape(len(ids), *self.feature_shape)

    # -- training and evaluation on the server ---------------------------------------------
    def _drop(self, key: NodeKey, reason: str, accepted: list[AcceptedReply]) -> None:
        """Take node key ``key`` out of the round after its reply was accepted: its
        stored features and server logits go, and its reply counts as rejected (or,
        for features stored in an earlier round, the drop is logged)."""
        self.store.remove(key)
        self.server_logits.pop(key, None)
        for reply in accepted:
            if reply.key == key:
                self.reject(reply.node_id, key, reason)
                break
        else:
            logger.warning("dropped the stored features of node key %r: %s", key, reason)

    def train_round(self, server_round: int, accepted: list[AcceptedReply]) -> dict[str, float]:
        """Store the accepted features, train the server model, refresh server logits
        (:meth:`start_training`, :meth:`run_training`, :meth:`finish_training`).

        A node whose features make the server's training or its server logits
        non-finite is taken out of the round. Returns the round's training metrics
        (the strategy's aggregated metrics).
        """
        job = self.start_training(server_round, accepted)
        self.run_training(job)
        return self.finish_training(job)

    def start_training(self, server_round: int, accepted: list[AcceptedReply]) -> TrainingJob:
        """Store round ``server_round``'s accepted features (and drop those past
        ``max-staleness``): the server training's input. Nothing trains yet."""
        # features kept from an earlier upload (unchanged) are not stored again
        cached = sum(self.store.put(r.key, r.payload, server_round) for r in accepted)
        for reply in accepted:
            if reply.digest is not None:
                self.held_train[reply.key] = reply.digest
        if self.max_staleness is not None:
            for key in self.store.nodes():
                if server_round - self.store.last_round(key) > self.max_staleness:
                    logger.info("dropping node key %r's features: older than max-staleness", key)
                    self.store.remove(key)
        return TrainingJob(server_round, accepted, self.current, cached)

    def run_training(self, job: TrainingJob) -> None:
        """Train the server model on the store and compute the server logits of the
        job's nodes (into the job, not yet sent anywhere). Reads the store and
        writes only the server model and the job, so it may run beside the
        validation of newer replies (``pipeline``)."""
        job.result = self.trainer.train(self.store, self.server_epochs)
        for reply in job.accepted:
            if reply.key in job.result.excluded:
                continue
            try:
                job.logits[reply.key] = self.trainer.logits_for(self.store, reply.key)
            except NonFiniteOutput as err:
                job.failed[reply.key] = str(err)

    def finish_training(self, job: TrainingJob) -> dict[str, float]:
        """Take the nodes that spoiled the training out, keep the new server logits
        and write the job's round log; the round's training metrics."""
        result = job.result
        if result is None:
            raise RuntimeError(f"round {job.server_round}'s server training did not run")
        accepted = job.accepted
        with self.logging_to(job.log):
            for key, reason in result.excluded.items():
                self._drop(key, reason, accepted)
            kept = []
            for reply in accepted:
                if reply.key in result.excluded:
                    continue
                if reply.key in job.failed:
                    self._drop(reply.key, job.failed[reply.key], [reply])
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
                mean = _per_sample_mean(kept, key)
                setattr(log, f"edge_{key.replace('-', '_')}", mean)
                if mean is not None:
                    metrics[f"edge-{key}"] = mean
            log.skipped_server_steps += result.skipped_steps
            log.server_train_seconds = result.seconds
            log.server_train_loss = result.loss
            log.server_train_ce = result.ce
            log.server_train_kd = result.kd
            log.server_train_accuracy = result.accuracy
            log.train_nodes = len(kept)
            log.train_samples = num_examples
            log.cached_feature_nodes = job.cached
            log.stored_nodes = len(self.store)
            log.stored_samples = self.store.num_samples
            log.stored_feature_bytes = self.store.nbytes
            log.server_peak_rss_bytes = peak_rss_bytes()
            self._note_progress(job.server_round, kept)
        return metrics

    @contextmanager
    def logging_to(self, log: RoundLog) -> Iterator[None]:
        """Record rejections and failures in ``log`` (an older round's, while a
        pipelined round is open) for the duration."""
        current, self.current = self.current, log
        try:
            yield
        finally:
            if self.current is log:
                self.current = current

    def _note_progress(self, server_round: int, kept: list[AcceptedReply]) -> None:
        """Count the rounds in a row in which no node replied usefully (every sampled
        node failed or was rejected); log their reasons with their counts."""
        log = self.current
        if kept or not (log.failed_nodes or log.rejected_replies):
            self.idle_rounds = 0
            return
        self.idle_rounds += 1
        self.idle_reasons = idle_reasons(log)
        logger.warning(
            "round %d: no node replied usefully (%d round(s) in a row): %s",
            server_round,
            self.idle_rounds,
            counted(self.idle_reasons),
        )

    def close_round(
        self, server_round: int, accepted: list[AcceptedReply]
    ) -> dict[str, float] | None:
        """Score the server model on the accepted test features, average the edge
        model's own scores per sample, and close the round's log (log line, history,
        ``on_round_end``, checkpoint). A node whose features give non-finite server
        logits is rejected; the others are scored.

        Returns the round's evaluation metrics, or None when no sample was scored.
        """
        correct, loss_sum, total = 0.0, 0.0, 0
        log_cached = 0
        scored = []
        for reply in accepted:
            payload = reply.payload
            try:
                scores = self.trainer.evaluate(
                    decode_features(payload.features), torch.from_numpy(payload.labels)
                )
            except NonFiniteOutput as err:
                self.reject(reply.node_id, reply.key, str(err))
                continue
            if reply.digest is not None:
                self.test_cache[reply.key] = (reply.digest, payload)
            else:
                log_cached += 1
            n = payload.num_samples
            correct += scores["accuracy"] * n
            loss_sum += scores["loss"] * n
            total += n
            scored.append(reply)

        log = self.current
        log.accuracy = correct / total if total else None
        log.loss = loss_sum / total if total else None
        log.edge_accuracy = _per_sample_mean(scored, "edge-accuracy")
        log.edge_loss = _per_sample_mean(scored, "edge-loss")
        log.eval_nodes = len(scored)
        log.eval_samples = total
        log.cached_test_nodes = log_cached
        before = self.history[-1] if self.history else {}
        log.cumulative_bytes_up = before.get("cumulative_bytes_up", 0) + log.bytes_up
        log.cumulative_bytes_down = before.get("cumulative_bytes_down", 0) + log.bytes_down
        log.seconds = time.perf_counter() - log.started
        log.ended_seconds = time.perf_counter() - (self.began or log.started)
        record = log.to_dict()
        self.history.append(record)
        logger.info(
            "round %d: accuracy %s | edge accuracy %s | up %.2f MB | down %.2f MB | "
            "server train %.1fs | round %.1fs | rejected %d",
            server_round,
            _fmt(log.accuracy),
            _fmt(log.edge_accuracy),
            log.bytes_up / 1e6,
            log.bytes_down / 1e6,
            log.server_train_seconds,
            log.seconds,
            len(log.rejected_replies),
        )
        if self.on_round_end is not None:
            self.on_round_end(record)
        if self.checkpoint_dir is not None:
            save_checkpoint(self.checkpoint_dir, server_round, self.state_dict())
            self.store.checkpointed()
        if self.max_idle_rounds and self.idle_rounds >= self.max_idle_rounds:
            raise NoProgressError(self.idle_rounds, self.idle_reasons)
        if log.accuracy is None or log.loss is None:
            return None
        metrics = {"num-examples": float(total), "accuracy": log.accuracy, "loss": log.loss}
        if log.edge_accuracy is not None:
            metrics["edge-accuracy"] = log.edge_accuracy
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the server needs to continue after the last finished round."""
        return {
            "trainer": self.trainer.state_dict(),
            "rng": rng_state(),
            "sampler": self.sampler.getstate(),
            "server_logits": self.server_logits,
            "nodes": self.registry.state(),
            "store": self.store.state_dict(),
            "held_train": dict(self.held_train),
            "history": self.history,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: the next round is ``state["round"] + 1``."""
        self.trainer.load_state_dict(state["trainer"])
        set_rng_state(state["rng"])
        if state.get("sampler") is not None:
            self.sampler.setstate(state["sampler"])
        self.server_logits = {str(k): v for k, v in state["server_logits"].items()}
        self.registry.restore(state.get("nodes", {}))
        self.store.load_state_dict(state.get("store"))
        self.held_train = {str(k): str(v) for k, v in state.get("held_train", {}).items()}
        self.history = list(state["history"])
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


def _per_sample_mean(replies: list[AcceptedReply], metric: str) -> float | None:
    """``metric`` averaged over the samples of the replies that report it (each
    node weighted by its sample count); None when none does."""
    pairs = [(r.metrics[metric], r.payload.num_samples) for r in replies if metric in r.metrics]
    samples = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / samples) if samples else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
