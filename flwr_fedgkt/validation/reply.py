"""One reply in, accepted or rejected with a reason out.

:meth:`ReplyValidator.check` takes a node's reply (a :class:`ReplyReader`: a
Flower face's view of the reply) through the checks in order of cost: its size,
its records, its round, dtype and codec, the node's key binding, then the
inflation of compressed features (bounded before anything is inflated), the
payload's arrays and bounds (:mod:`flwr_fedgkt.validation.payload`), its metrics
and the sample-ownership claims. It changes no state: the caller commits an
accepted reply.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..codec import FeaturePayload, NodeKey, PayloadError, decode_features, wire_dtype
from ..compression import CompressionError, inflate
from ..identity import PROOF_KEY, PUBLIC_KEY, statement, verify_proof
from ..privacy import Defences
from ..registry import KeyProof, NodeRegistry, features_digest
from ..sketch import sketches_of
from .federation import PayloadRange, range_of
from .payload import validate_metrics, validate_node_key, validate_payload, validate_update

__all__ = [
    "COMPRESSION_KEY",
    "EXTRACTOR_KEY",
    "NODE_KEY",
    "PRECISION_KEY",
    "AcceptedReply",
    "Rejection",
    "ReplyParts",
    "ReplyReader",
    "ReplyValidator",
    "proof_of",
]

logger = logging.getLogger("flwr.fedgkt")

NODE_KEY = "node-key"
"""The meta entry in which a reply names its node's stable key."""
PRECISION_KEY = "precision"
"""The meta entry in which a training reply names the precision it trained in."""
EXTRACTOR_KEY = "extractor-digest"
"""The meta entry in which a node with a frozen extractor names its digest
(:func:`flwr_fedgkt.models.module_digest`)."""
COMPRESSION_KEY = "compression"
"""The meta entry in which a reply names the codec of its feature bytes
(``none`` when absent); also the round config's entry naming the round's codec."""

MAX_INFLATION = 32
"""How many times its compressed size a reply's features may inflate to. Honest
edge features compress 1x to 2.6x (measured: int8 and float16 features of the
paper's ResNet-8 and of Flower's quickstart Net on digits); a zstd bomb (a small
frame declaring gigabytes) is refused before anything is inflated."""
INFLATION_FLOOR = 1 << 16
"""Bytes any reply may inflate to, whatever its compressed size."""

ReplyParts = tuple[Mapping[str, Any], Mapping[str, np.ndarray], Mapping[str, Any]]
"""What a reply holds: its meta values, its arrays by name, its metrics."""


class ReplyReader(Protocol):
    """One node's reply as a Flower face received it."""

    node_id: int
    nbytes: int  # bytes of its arrays, as Flower counts them
    # (optional) ``kind``: the message whose proof it carries, when not its own
    # phase's ("train" for the test upload of a training reply)

    def read(self) -> ReplyParts:
        """Decode the reply; raise (anything) when it cannot be decoded."""
        ...


def proof_of(
    meta: Mapping[str, Any], kind: str, key: NodeKey, node_id: int, server_round: int
) -> KeyProof | None:
    """The proof of ``key`` a reply's meta carries for this message (``kind``,
    node id, round; :func:`~flwr_fedgkt.identity.statement`); None when it
    carries none."""
    if PUBLIC_KEY not in meta and PROOF_KEY not in meta:
        return None
    public, proof = meta.get(PUBLIC_KEY), meta.get(PROOF_KEY)
    message = statement(kind, key, node_id, server_round)
    valid = verify_proof(public, proof, message)
    return KeyProof(public if isinstance(public, str) else "", valid)


@dataclass
class AcceptedReply:
    """A reply that passed validation: who sent it, its payload, its checked metrics."""

    node_id: int
    key: NodeKey
    payload: FeaturePayload
    metrics: dict[str, float]
    digest: str | None = None  # of the features it sent; None: it sent none (unchanged)
    precision: str | None = None  # the precision the node says it trained in
    proof: KeyProof | None = None  # its proof of the key (None: it sent none)
    sketches: np.ndarray | None = None  # its samples' sketches (None: it sent no features)
    span: PayloadRange | None = None  # its features' and logits' range (likewise)
    defences: Defences = field(default_factory=Defences)  # what the node says it applied


@dataclass
class Rejection:
    """A reply that failed validation, with the reason."""

    node_id: int
    key: NodeKey | None
    reason: str


class ReplyValidator:
    """The server's checks of one reply, against what the round expects.

    Parameters
    ----------
    feature_dtype, feature_shape, num_classes, compression
        What every reply of the run must carry: the wire dtype, one sample's
        feature shape, the class count, the round's codec (or ``none``).
    max_reply_bytes, max_feature_abs, max_logit_abs
        Bounds on a reply's bytes (0: none), decoded features and edge logits.
    registry : NodeRegistry
        Node keys and sample ownership (read here, committed by the caller).
    held_payload : Callable[[NodeKey, bool], FeaturePayload | None]
        The upload whose features the server holds for a key (training or test):
        a reply without features reuses it.
    connected : Callable[[], Collection[int]]
        The node ids connected now.
    extractor_digest : str | None (default: None)
        The digest of the frozen extractor every node shares; a reply that names
        another (or none) is rejected. None: nodes have extractors of their own.
    """

    def __init__(
        self,
        *,
        feature_dtype: str,
        feature_shape: tuple[int, ...],
        num_classes: int,
        compression: str,
        max_reply_bytes: int,
        max_feature_abs: float,
        max_logit_abs: float,
        registry: NodeRegistry,
        held_payload: Callable[[NodeKey, bool], FeaturePayload | None],
        connected: Callable[[], Collection[int]],
        extractor_digest: str | None = None,
    ) -> None:
        self.feature_dtype = feature_dtype
        self.feature_shape = feature_shape
        self.num_classes = num_classes
        self.compression = compression
        self.max_reply_bytes = max_reply_bytes
        self.max_feature_abs = max_feature_abs
        self.max_logit_abs = max_logit_abs
        self.registry = registry
        self.held_payload = held_payload
        self.connected = connected
        self.extractor_digest = extractor_digest

    def check(
        self, reply: ReplyReader, server_round: int, training: bool
    ) -> AcceptedReply | Rejection:
        """The reply accepted, or rejected with its reason. Nothing a node sends
        raises out of here."""
        node_id = reply.node_id
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
            # the message the node signed: a test upload in a training reply names "train"
            kind = getattr(reply, "kind", None) or ("train" if training else "evaluate")
            return self._check(node_id, key, meta, arrays, metrics, server_round, training, kind)
        except PayloadError as err:
            return Rejection(node_id, key, str(err))
        except Exception as err:  # a check that itself failed: still only this reply
            logger.error("validating node %s's reply failed:\n%s", node_id, traceback.format_exc())
            return Rejection(node_id, key, f"could not be validated: {type(err).__name__}: {err}")

    # pylint: disable=too-many-arguments
    def _check(
        self,
        node_id: int,
        key: NodeKey,
        meta: Mapping[str, Any],
        arrays: Mapping[str, np.ndarray],
        metrics: Mapping[str, Any],
        server_round: int,
        training: bool,
        kind: str,
    ) -> AcceptedReply:
        """Check a reply's round, dtype, key, arrays and metrics; raise PayloadError
        naming what is wrong. ``kind``: the message whose proof the reply carries."""
        reply_round = meta.get("server-round")
        if reply_round != server_round:
            raise PayloadError(f"reply is for round {reply_round!r}, expected {server_round}")
        dtype = meta.get("feature-dtype")
        if dtype != self.feature_dtype:
            raise PayloadError(f"feature dtype {dtype!r}, expected {self.feature_dtype!r}")
        proof = proof_of(meta, kind, key, node_id, server_round)
        self.registry.check_binding(key, node_id, self.connected(), proof)
        if self.extractor_digest is not None and meta.get(EXTRACTOR_KEY) != self.extractor_digest:
            raise PayloadError(
                f"the node's extractor ({meta.get(EXTRACTOR_KEY)!r}) is not the strategy's "
                f"({self.extractor_digest!r}): build every node's edge model from the same "
                "seed and keep its extractor frozen (FedGKTClient(freeze_extractor=True))"
            )
        try:
            defences = Defences.from_meta(meta)
        except ValueError as err:
            raise PayloadError(f"defences: {err}") from None
        codec = meta.get(COMPRESSION_KEY, "none")
        if codec not in ("none", self.compression):
            raise PayloadError(f"compression {codec!r}, the round uses {self.compression!r}")
        digest, sketches, span = None, None, None
        split = "train" if training else "test"
        if "features" in arrays:
            self._check_before_inflating(key, arrays, training, split)
            if codec != "none":
                arrays = {**arrays, "features": self._inflate(arrays, str(codec))}
        if "features" not in arrays:
            cached = self.held_payload(key, training)
            if cached is None:
                raise PayloadError("missing arrays: features (the server holds none of this node)")
            payload = validate_update(
                arrays, cached, self.num_classes, training, self.max_logit_abs
            )
        else:
            payload = validate_payload(
                arrays,
                self.feature_dtype,
                self.feature_shape,
                self.num_classes,
                require_logits=training,
                max_feature_abs=self.max_feature_abs,
                max_logit_abs=self.max_logit_abs,
            )
            digest = features_digest(payload)
            decoded = decode_features(payload.features)  # once, for sketches and range
            sketches, span = sketches_of(decoded), range_of(decoded, payload.logits)
        checked = validate_metrics(metrics, payload.num_samples)
        self.registry.check_claims(key, payload, split, digest, sketches)
        precision = meta.get(PRECISION_KEY)
        return AcceptedReply(
            node_id,
            key,
            payload,
            checked,
            digest,
            precision if isinstance(precision, str) else None,
            proof,
            sketches,
            span,
            defences,
        )

    def _check_before_inflating(
        self, key: NodeKey, arrays: Mapping[str, np.ndarray], training: bool, split: str
    ) -> None:
        """The checks that need no inflation: the arrays a reply with features must
        carry, their lengths, and a sample count the server can justify (the key's
        partition size when the server knows it, else twice the count of the key's
        first upload of the split)."""
        needed = ("ids", "labels", "logits") if training else ("ids", "labels")
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise PayloadError(f"missing arrays: {', '.join(missing)}")
        ids, labels = arrays["ids"], arrays["labels"]
        if ids.ndim != 1 or labels.shape != ids.shape:
            raise PayloadError(
                f"ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be 1-D and "
                "of one length"
            )
        if training and (arrays["logits"].ndim != 2 or len(arrays["logits"]) != len(ids)):
            raise PayloadError(
                f"logits {tuple(arrays['logits'].shape)} must be one row per sample ({len(ids)})"
            )
        limit, source = self._count_limit(key, split)
        if limit is not None and len(ids) > limit:
            raise PayloadError(
                f"{len(ids)} samples, more than node key {key!r} can hold ({limit}: {source})"
            )

    def _count_limit(self, key: NodeKey, split: str) -> tuple[int | None, str]:
        """The most samples a reply of ``key`` may carry for ``split``, and why."""
        if self.registry.sample_ids is not None:
            allowed = self.registry.sample_ids(key, split)
            if allowed is not None:
                return len(allowed), "its partition's size"
        first = self.registry.first_seen(key, split)
        if first is not None:
            return 2 * first, "twice its first upload"
        return None, ""

    def _inflate(self, arrays: Mapping[str, np.ndarray], codec: str) -> np.ndarray:
        """The compressed ``features`` of a reply, inflated to ``N x feature shape``
        in the wire dtype, ``N`` from its ids. The bound is checked before
        anything is inflated (:func:`~flwr_fedgkt.compression.inflate`), and it
        is at most ``max-reply-bytes`` when that is set, as for uncompressed
        replies."""
        ids = arrays["ids"]  # present and 1-D (_check_before_inflating)
        dtype = wire_dtype(self.feature_dtype)
        per_sample = int(np.prod(self.feature_shape)) * dtype.itemsize
        expected = len(ids) * per_sample
        if self.max_reply_bytes and expected > self.max_reply_bytes:
            raise PayloadError(
                f"compressed features of {len(ids)} samples would inflate to {expected} "
                f"bytes, beyond max-reply-bytes ({self.max_reply_bytes}); not inflated"
            )
        sent = int(arrays["features"].nbytes)
        if expected > max(MAX_INFLATION * sent, INFLATION_FLOOR):
            raise PayloadError(
                f"compressed features of {sent} bytes would inflate to {expected} bytes "
                f"({len(ids)} samples), more than {MAX_INFLATION} times; not inflated"
            )
        try:
            raw = inflate(arrays["features"], codec, expected)
        except CompressionError as err:
            raise PayloadError(f"{err}{self._shape_hint(arrays['features'], len(ids))}") from None
        return np.frombuffer(raw, dtype=dtype).reshape(len(ids), *self.feature_shape)

    def _shape_hint(self, blob: np.ndarray, count: int) -> str:
        """When a zstd frame holds a whole number of values per sample other than
        the server's feature shape: a clause naming both sizes."""
        import zstandard

        try:
            declared = zstandard.frame_content_size(np.ascontiguousarray(blob).tobytes())
        except Exception:  # not a frame: the error says so already
            return ""
        itemsize = wire_dtype(self.feature_dtype).itemsize
        if declared <= 0 or not count or declared % (count * itemsize):
            return ""
        values = declared // (count * itemsize)
        shape = "x".join(map(str, self.feature_shape))
        return (
            f" (features of {values} values per sample; the server takes {shape} = "
            f"{int(np.prod(self.feature_shape))}: the edge model's output and the server's "
            "feature_shape disagree)"
        )
