"""Feature payloads, as one import: the wire codec (:mod:`flwr_fedgkt.codec`),
reply validation (:mod:`flwr_fedgkt.validation`) and the feature store
(:mod:`flwr_fedgkt.store`).

This module imports no Flower code.
"""

from __future__ import annotations

from .codec import (
    FEATURE_DTYPES,
    EncodedFeatures,
    FeaturePayload,
    NodeKey,
    PayloadError,
    check_dtype_name,
    decode_features,
    encode_features,
    encoded_digest,
    read_npy_header,
    wire_dtype,
)
from .store import Batch, FeatureStore, file_label
from .validation.payload import (
    MAX_FEATURE_ABS,
    MAX_LOGIT_ABS,
    validate_metrics,
    validate_node_key,
    validate_payload,
    validate_update,
)

__all__ = [
    "FEATURE_DTYPES",
    "MAX_FEATURE_ABS",
    "MAX_LOGIT_ABS",
    "Batch",
    "EncodedFeatures",
    "FeaturePayload",
    "FeatureStore",
    "NodeKey",
    "PayloadError",
    "check_dtype_name",
    "decode_features",
    "encode_features",
    "encoded_digest",
    "file_label",
    "read_npy_header",
    "validate_metrics",
    "validate_node_key",
    "validate_payload",
    "validate_update",
    "wire_dtype",
]
