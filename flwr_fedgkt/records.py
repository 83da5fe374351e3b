"""How FedGKT payloads travel in Flower records (the only Flower-aware codec code).

Upload (client -> server), in the reply's ``RecordDict``:
    ``"features"``: ArrayRecord with ``features`` (wire dtype), ``labels``, ``ids`` and,
    for training, ``logits``; for ``int8`` also ``feature_scale``/``feature_offset``.
    ``"metrics"``: MetricRecord with ``num-examples`` and the edge's own metrics.
    ``"meta"``: ConfigRecord with ``feature-dtype``, ``server-round`` and
    ``node-key`` (the node's stable key, by default its partition id); a
    training reply of :class:`~flwr_fedgkt.client.FedGKTClient` also says the
    ``precision`` it trained in.
    The reply's ``meta`` also says the ``compression`` of its ``features``
    (``none`` when absent; with ``zstd`` the array is the Zstandard frame of the
    feature bytes as 1-D ``uint8``, see :mod:`flwr_fedgkt.compression`).
    The server's config names the digest of the features it holds for the node
    (``held-features``); a node whose features have that digest (they have not
    changed, e.g. with a frozen extractor) sends a ``"features"`` record with
    only ``ids`` (and ``logits`` for training).
Key query (server -> client, a ``query`` Message, before a node's first round):
    ``"config"``: ConfigRecord ``{"fedgkt-query": "node-key"}``; the reply carries
    ``"meta"``: ConfigRecord ``{"node-key": ...}``.
Download (server -> client):
    ``"server_logits"``: ArrayRecord with ``ids`` and ``logits`` (absent in round 1).
    ``"config"``: ConfigRecord with the round's settings: ``server-round``,
    ``feature-dtype``, ``compression``, ``freeze-extractor`` (train with the
    extractor frozen this round), ``held-features`` and the training settings.
"""

from __future__ import annotations

import io
from collections.abc import Collection

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SType

from .codec import PayloadError, read_npy_header
from .edge import Extracted
from .node import RoundInstructions
from .validation import COMPRESSION_KEY, NODE_KEY, PRECISION_KEY, ReplyParts

__all__ = [
    "MessageReply",
    "FEATURES_KEY",
    "LOGITS_KEY",
    "METRICS_KEY",
    "META_KEY",
    "TEST_FEATURES_KEY",
    "TEST_METRICS_KEY",
    "has_test_upload",
    "CONFIG_KEY",
    "QUERY_KEY",
    "PRECISION_KEY",
    "COMPRESSION_KEY",
    "NODE_KEY",
    "features_record",
    "logits_record",
    "record_arrays",
    "array_view",
    "arrays_bytes",
    "arrays_record",
]

FEATURES_KEY = "features"
LOGITS_KEY = "server_logits"
METRICS_KEY = "metrics"
META_KEY = "meta"
TEST_FEATURES_KEY = "test-features"
"""A training reply's upload of the test split (asked for with ``test-features``)."""
TEST_METRICS_KEY = "test-metrics"
"""The edge model's own scores on that test split, in a training reply."""
CONFIG_KEY = "config"
QUERY_KEY = "fedgkt-query"
"""In a ``query`` Message's config: what the server asks (``node-key``: the node's
key, answered in a ``meta`` ConfigRecord)."""


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()},
        keep_input=True,
    )


def features_record(
    extracted: Extracted, ins: RoundInstructions, with_logits: bool = True
) -> ArrayRecord:
    """:meth:`Extracted.arrays <flwr_fedgkt.edge.Extracted.arrays>` as an
    ArrayRecord, as the round's instructions ask (wire dtype, compression, the
    digest of the features the server holds)."""
    return arrays_record(extracted.arrays(ins.dtype, with_logits, ins.held, ins.compression))


def logits_record(ids: np.ndarray, logits: np.ndarray) -> ArrayRecord:
    return arrays_record({"ids": ids.astype(np.int64), "logits": logits.astype(np.float32)})


def record_arrays(record: ArrayRecord, views: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The numpy arrays of an ArrayRecord, by key.

    Arrays named in ``views`` are read-only views of the bytes the message already
    holds, not copies (:func:`array_view`), so that a large upload is not held
    twice while the server decodes it; the others are copies.
    """
    return {
        key: array_view(array) if key in views else array.numpy() for key, array in record.items()
    }


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of an ``Array``'s ``.npy`` bytes (no copy).

    Raises ValueError for data that is not a plain ``.npy`` array.
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    data = array.data
    header = read_npy_header(io.BytesIO(data))
    if header.offset + header.nbytes != len(data):
        raise ValueError(
            f"array of shape {header.shape} and dtype {header.dtype} does not match its "
            f"{len(data)} bytes"
        )
    return header.view(data)


def arrays_bytes(content: RecordDict) -> int:
    """Bytes of all ArrayRecords in a message's content, as Flower counts them."""
    return int(sum(rec.count_bytes() for rec in content.array_records.values()))


def round_config(values: dict[str, int | float | str]) -> ConfigRecord:
    return ConfigRecord(dict(values))


class MessageReply:
    """A reply Message, read as the engine reads replies (:class:`ReplyReader`).

    With ``test`` it is the test split's upload that a training reply carries
    (:data:`TEST_FEATURES_KEY`, :data:`TEST_METRICS_KEY`), read as an evaluation
    reply whose proof was signed for the training message (``kind``); without,
    the reply's own upload, its bytes counted without that test upload."""

    def __init__(self, msg: Message, test: bool = False) -> None:
        self.msg = msg
        self.node_id = msg.metadata.src_node_id
        self.test = test
        records = msg.content.array_records
        test_bytes = records[TEST_FEATURES_KEY].count_bytes() if TEST_FEATURES_KEY in records else 0
        self.nbytes = int(test_bytes) if test else arrays_bytes(msg.content) - int(test_bytes)

    @property
    def kind(self) -> str | None:
        """The message whose proof the reply carries, when not its own phase's."""
        return "train" if self.test else None

    def read(self) -> ReplyParts:
        """The meta values, arrays (the uploaded features as views of the message's
        bytes) and metrics; a missing record raises PayloadError.

        Records and arrays other than those in :mod:`flwr_fedgkt.records` are ignored.
        """
        content = self.msg.content
        features = TEST_FEATURES_KEY if self.test else FEATURES_KEY
        metrics = TEST_METRICS_KEY if self.test else METRICS_KEY
        for key, records, kind in (
            (features, content.array_records, "ArrayRecord"),
            (META_KEY, content.config_records, "ConfigRecord"),
            (metrics, content.metric_records, "MetricRecord"),
        ):
            if key not in records:
                raise PayloadError(f"missing {kind} {key!r}")
        arrays = record_arrays(content.array_records[features], views=("features",))
        return content.config_records[META_KEY], arrays, content.metric_records[metrics]


def has_test_upload(msg: Message) -> bool:
    """Whether a training reply carries its node's test upload as well."""
    return not msg.has_error() and TEST_FEATURES_KEY in msg.content.array_records
