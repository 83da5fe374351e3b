"""Validation of what a node sends: payload arrays, metrics and node keys.

Every check raises :class:`~flwr_fedgkt.codec.PayloadError` naming the first
thing that is wrong; nothing here changes any state.

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..codec import (
    _WIRE_NUMPY_DTYPE,
    EncodedFeatures,
    FeaturePayload,
    PayloadError,
    check_dtype_name,
)

__all__ = [
    "MAX_FEATURE_ABS",
    "MAX_LOGIT_ABS",
    "validate_metrics",
    "validate_node_key",
    "validate_payload",
    "validate_update",
]

MAX_FEATURE_ABS = 1e6
"""Default absolute bound on the magnitude of a decoded feature value: a sanity
bound, far above any activation of a model on normalised or raw (0..255) inputs;
a node whose features exceed it is rejected (see :func:`validate_payload`). The
bound that tracks what honest nodes send is relative: features far above the
other nodes' are rejected (:mod:`flwr_fedgkt.validation.federation`). The ResNet-8
stem's post-ReLU activations on the built-in data sets stayed below 7 (digits and
synthetic, four edge epochs at learning rates 0.001 and 0.01)."""
MAX_LOGIT_ABS = 1e4
"""Default bound on the magnitude of an edge logit (honest edges stay below 100)."""
MAX_NODE_KEY_LENGTH = 128

_INT64_MAX = np.iinfo(np.int64).max


def _checked_logits(
    logits: np.ndarray, n: int, num_classes: int, max_abs: float = MAX_LOGIT_ABS
) -> np.ndarray:
    """``logits`` if they are finite ``n x num_classes`` float32 of magnitude at most
    ``max_abs``, else PayloadError."""
    if logits.dtype != np.float32:
        raise PayloadError(f"logits have dtype {logits.dtype}, expected float32")
    if logits.shape != (n, num_classes):
        raise PayloadError(
            f"logits have shape {tuple(logits.shape)}, expected ({n}, {num_classes})"
        )
    if not np.isfinite(logits).all():
        raise PayloadError("logits contain NaN or Inf")
    if logits.size and max(-float(logits.min()), float(logits.max())) > max_abs:
        raise PayloadError(
            f"logits reach {max(-float(logits.min()), float(logits.max())):.3g}, "
            f"beyond the bound of {max_abs:g}"
        )
    return logits


def _checked_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """``ids`` as int64 if they are ``n`` distinct non-negative integers that fit in
    int64 without wrapping, else PayloadError."""
    if ids.dtype.kind not in "iu":
        raise PayloadError(f"ids have dtype {ids.dtype}, expected an integer dtype")
    if ids.shape != (n,):
        raise PayloadError(f"ids have shape {tuple(ids.shape)}, expected ({n},)")
    if n and ids.dtype.kind == "u" and int(ids.max()) > _INT64_MAX:
        raise PayloadError(f"sample id {int(ids.max())} does not fit in int64")
    if n and int(ids.min()) < 0:
        raise PayloadError(f"negative sample id {int(ids.min())}")
    out = ids.astype(np.int64, copy=False)
    if np.unique(out).size != n:
        raise PayloadError(f"duplicate sample ids ({n - np.unique(out).size} repeated)")
    return out


def _feature_magnitude(features: np.ndarray, dtype: str) -> float:
    """Largest ``|x|`` of wire-dtype ``float32``/``float16``/``bfloat16`` features
    (Inf or NaN give ``inf``), without widening the whole array."""
    if dtype == "bfloat16":  # raw bits: with the sign cleared, bits order like values
        magnitude = int((features.view(np.uint16) & 0x7FFF).max())
        if magnitude >= 0x7F80:
            return float("inf")
        return float(np.array([magnitude << 16], dtype=np.uint32).view(np.float32)[0])
    lo, hi = float(features.min()), float(features.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return float("inf")
    return max(-lo, hi)


def validate_payload(
    arrays: Mapping[str, np.ndarray],
    dtype: str,
    feature_shape: tuple[int, ...],
    num_classes: int,
    require_logits: bool = True,
    max_feature_abs: float = MAX_FEATURE_ABS,
    max_logit_abs: float = MAX_LOGIT_ABS,
) -> FeaturePayload:
    """Check every part of an incoming payload and build a :class:`FeaturePayload`.

    Raises :class:`PayloadError` naming the first thing that is wrong: a missing
    array, a wrong shape or dtype, non-finite values, decoded feature values beyond
    ``max_feature_abs`` (for ``int8``: a scale that is not positive and finite, an
    offset that is not finite, or a code range ``offset + [0, 255] * scale`` that
    leaves the bound), logits beyond ``max_logit_abs``, labels out of range, lengths
    that disagree, duplicate or negative sample ids, ids that do not fit in int64.
    Arrays other than those listed in :mod:`flwr_fedgkt.records` are ignored.
    """
    check_dtype_name(dtype)
    required = ["features", "labels", "ids"] + (["logits"] if require_logits else [])
    if dtype == "int8":
        required += ["feature_scale", "feature_offset"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise PayloadError(f"missing arrays: {', '.join(missing)}")

    features = arrays["features"]
    expected_dtype = _WIRE_NUMPY_DTYPE[dtype]
    if features.dtype != expected_dtype:
        raise PayloadError(
            f"features have dtype {features.dtype}, expected {expected_dtype} for {dtype!r}"
        )
    if tuple(features.shape[1:]) != tuple(feature_shape):
        expected = ", ".join(map(str, feature_shape))
        raise PayloadError(f"features have shape {tuple(features.shape)}, expected (N, {expected})")
    n = features.shape[0]
    if n == 0:
        raise PayloadError("payload holds no samples")

    labels = arrays["labels"]
    if labels.dtype.kind not in "iu":
        raise PayloadError(f"labels have dtype {labels.dtype}, expected an integer dtype")
    if labels.shape != (n,):
        raise PayloadError(
            f"labels have shape {tuple(labels.shape)}, expected ({n},) to match the features"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise PayloadError(
            f"labels out of range: min {labels.min()}, max {labels.max()}, classes {num_classes}"
        )
    ids = _checked_ids(arrays["ids"], n)

    logits = np.zeros((n, num_classes), dtype=np.float32)
    if require_logits:
        logits = _checked_logits(arrays["logits"], n, num_classes, max_logit_abs)

    scale = offset = None
    if dtype == "int8":
        scale, offset = arrays["feature_scale"], arrays["feature_offset"]
        for name, arr in (("feature_scale", scale), ("feature_offset", offset)):
            if arr.dtype != np.float32 or arr.shape != (feature_shape[0],):
                raise PayloadError(
                    f"{name} has shape {tuple(arr.shape)} and dtype {arr.dtype}, "
                    f"expected ({feature_shape[0]},) float32"
                )
            if not np.isfinite(arr).all():
                raise PayloadError(f"{name} contains NaN or Inf")
        if not (scale > 0).all():
            raise PayloadError(f"feature_scale must be positive, got min {float(scale.min()):g}")
        # decoded values lie in offset + [0, 255] * scale (in float64: no overflow)
        low = offset.astype(np.float64)
        high = low + 255.0 * scale.astype(np.float64)
        magnitude = float(max(np.abs(low).max(), np.abs(high).max()))
    else:
        magnitude = _feature_magnitude(features, dtype)
        if not np.isfinite(magnitude):
            raise PayloadError("features contain NaN or Inf")
    if magnitude > max_feature_abs:
        raise PayloadError(
            f"decoded features reach {magnitude:.3g}, beyond max-feature-abs ({max_feature_abs:g})"
        )

    return FeaturePayload(
        features=EncodedFeatures(dtype, features, scale, offset),
        logits=logits,
        labels=labels.astype(np.int64, copy=False),
        ids=ids,
    )


def validate_update(
    arrays: Mapping[str, np.ndarray],
    cached: FeaturePayload,
    num_classes: int,
    require_logits: bool = True,
    max_logit_abs: float = MAX_LOGIT_ABS,
) -> FeaturePayload:
    """Check a reply that carries no features because the server holds them already
    (``freeze-extractor``): its ``ids`` must be the cached upload's, in the same
    order, and its ``logits`` (for training) must be finite ``N x K`` float32.

    Returns the cached payload with the new logits (the same feature arrays, not a
    copy); raises :class:`PayloadError` naming what is wrong.
    """
    required = ["ids"] + (["logits"] if require_logits else [])
    missing = [k for k in required if k not in arrays]
    if missing:
        raise PayloadError(f"missing arrays: {', '.join(missing)}")
    ids = arrays["ids"]
    if ids.dtype.kind not in "iu" or ids.shape != cached.ids.shape:
        raise PayloadError(
            f"ids have shape {tuple(ids.shape)} and dtype {ids.dtype}, expected "
            f"{tuple(cached.ids.shape)} integers like the features the server holds"
        )
    if not np.array_equal(_checked_ids(ids, cached.num_samples), cached.ids):
        raise PayloadError("ids differ from those of the features the server holds")
    logits = cached.logits
    if require_logits:
        logits = _checked_logits(arrays["logits"], cached.num_samples, num_classes, max_logit_abs)
    return FeaturePayload(cached.features, logits, cached.labels, cached.ids)


# What the server reads from a reply's metrics (Flower's kebab-case), the range each
# must lie in, and the snake_case name a node may still send it under. Other keys
# are ignored (a node may report more; nothing reads it).
_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "num-examples": (0.0, float(_INT64_MAX)),
    "train-loss": (0.0, float("inf")),
    "train-ce": (0.0, float("inf")),
    "train-kd": (0.0, float("inf")),
    "train-accuracy": (0.0, 1.0),
    "edge-loss": (0.0, float("inf")),
    "edge-accuracy": (0.0, 1.0),
    # where a node's time went (the round's profile)
    "edge-train-seconds": (0.0, 1e7),
    "edge-extract-seconds": (0.0, 1e7),
    "edge-encode-seconds": (0.0, 1e7),
    "node-seconds": (0.0, 1e7),
}
_METRIC_ALIASES = {
    "train_loss": "train-loss",
    "train_accuracy": "train-accuracy",
    "edge_loss": "edge-loss",
    "edge_accuracy": "edge-accuracy",
}


def validate_metrics(metrics: Mapping[str, Any], num_samples: int) -> dict[str, float]:
    """The metrics the server uses, checked; raise PayloadError naming what is wrong.

    Each known key (``num-examples``, ``train-loss``, ``train-ce``, ``train-kd``,
    ``train-accuracy``, ``edge-loss``, ``edge-accuracy``; the last four also under
    their snake_case names ``train_loss``, ...), when present, must be a single finite number in its
    range: accuracies in [0, 1], losses non-negative, ``num-examples`` a
    non-negative integer equal to ``num_samples`` (the samples the reply carries).
    Lists, strings, bytes and booleans are rejected for these keys. Unknown keys
    are ignored and not returned.
    """
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        key = _METRIC_ALIASES.get(name, name)
        if key not in _METRIC_RANGES:
            continue
        low, high = _METRIC_RANGES[key]
        if key in checked:
            raise PayloadError(f"metric {key!r} is sent twice (as {name!r} too)")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise PayloadError(f"metric {name!r} is a {type(value).__name__}, expected a number")
        number = float(value)
        if not np.isfinite(number) or not low <= number <= high:
            raise PayloadError(f"metric {name!r} = {number!r} lies outside [{low:g}, {high:g}]")
        checked[key] = number
    if "num-examples" in checked:
        count = checked["num-examples"]
        if not count.is_integer() or int(count) != num_samples:
            raise PayloadError(
                f"metric 'num-examples' = {count:g} but the reply carries {num_samples} samples"
            )
    return checked


def validate_node_key(key: Any) -> str:
    """A node key as sent by a node: a non-empty printable string of at most
    128 characters; raise PayloadError otherwise."""
    if not isinstance(key, str):
        raise PayloadError(f"node-key is a {type(key).__name__}, expected a string")
    if not key or len(key) > MAX_NODE_KEY_LENGTH or not key.isprintable():
        raise PayloadError(
            f"node-key {key[:40]!r} must be 1 to {MAX_NODE_KEY_LENGTH} printable characters"
        )
    return key
