"""Validation of what nodes send: a payload's arrays, metrics and node key
(:mod:`~flwr_fedgkt.validation.payload`), and a whole reply, accepted or rejected
with a reason (:mod:`~flwr_fedgkt.validation.reply`).

This module imports no Flower code.
"""

from __future__ import annotations

from .payload import (
    MAX_FEATURE_ABS,
    MAX_LOGIT_ABS,
    validate_metrics,
    validate_node_key,
    validate_payload,
    validate_update,
)
from .reply import (
    COMPRESSION_KEY,
    EXTRACTOR_KEY,
    NODE_KEY,
    PRECISION_KEY,
    AcceptedReply,
    Rejection,
    ReplyParts,
    ReplyReader,
    ReplyValidator,
    proof_of,
)

__all__ = [
    "COMPRESSION_KEY",
    "EXTRACTOR_KEY",
    "MAX_FEATURE_ABS",
    "MAX_LOGIT_ABS",
    "NODE_KEY",
    "PRECISION_KEY",
    "AcceptedReply",
    "Rejection",
    "ReplyParts",
    "ReplyReader",
    "ReplyValidator",
    "proof_of",
    "validate_metrics",
    "validate_node_key",
    "validate_payload",
    "validate_update",
]
