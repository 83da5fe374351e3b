"""Deprecated alias of :mod:`flwr_fedgkt.legacy`, kept for one release.

Import from ``flwr_fedgkt.legacy`` (and ``server_fn`` from
``flwr_fedgkt.legacy.server_app``) instead; importing this module warns.
"""

from __future__ import annotations

import warnings

from .legacy import (
    EVALUATE_ARRAY_PREFIX,
    FIT_ARRAYS,
    INT8_ARRAYS,
    FedGKTNumPyClient,
    LegacyFedGKT,
    samples_from_loader,
)
from .legacy.server_app import server_fn

__all__ = [
    "FIT_ARRAYS",
    "INT8_ARRAYS",
    "EVALUATE_ARRAY_PREFIX",
    "FedGKTNumPyClient",
    "LegacyFedGKT",
    "samples_from_loader",
    "server_fn",
]

warnings.warn(
    "flwr_fedgkt.compat is deprecated and will be removed in the next release; import "
    "from flwr_fedgkt.legacy (server_fn from flwr_fedgkt.legacy.server_app)",
    DeprecationWarning,
    stacklevel=2,
)
