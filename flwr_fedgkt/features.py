"""Feature payloads: the wire codec, validation of incoming replies, the feature store.

A client's upload is a :class:`FeaturePayload`: its training split's feature maps
(in a compact *wire dtype*), its edge logits, labels and sample ids. The server
keeps features at rest in the wire dtype and widens them to float32 one batch at a
time (:meth:`FeatureStore.batches`).

Wire dtypes
-----------
``float32``  exact.
``float16``  relative error <= 2^-11 in the normal range.
``bfloat16`` relative error <= 2^-8 (sent as the raw 16 bits in an ``int16`` array).
``int8``     8-bit affine per channel: ``x ~= offset[c] + scale[c] * q`` with ``q`` in
             0..255 (sent as ``uint8``); absolute error <= scale[c] / 2, i.e. half a
             step of the channel's range / 255. Edge features are post-ReLU and
             non-negative, so an affine code uses all 256 levels where a symmetric
             int8 code would waste half of them.

This module imports no Flower code.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .files import write_atomic

__all__ = [
    "FEATURE_DTYPES",
    "PayloadError",
    "EncodedFeatures",
    "FeaturePayload",
    "encode_features",
    "encoded_digest",
    "decode_features",
    "validate_payload",
    "validate_update",
    "validate_metrics",
    "check_dtype_name",
    "wire_dtype",
    "validate_node_key",
    "MAX_FEATURE_ABS",
    "MAX_LOGIT_ABS",
    "FeatureStore",
    "Batch",
    "NodeKey",
]

FEATURE_DTYPES = ("float32", "float16", "bfloat16", "int8")

_WIRE_NUMPY_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.int16),
    "int8": np.dtype(np.uint8),
}


MAX_FEATURE_ABS = 1e4
"""Default bound on the magnitude of a decoded feature value. The ResNet-8 stem's
post-ReLU activations on the built-in data sets stayed below 7 (digits and
synthetic, four edge epochs at learning rates 0.001 and 0.01); a node whose
features exceed the bound is rejected (see :func:`validate_payload`). Models fed
unnormalised inputs (e.g. pixels in 0..255) need a larger bound."""
MAX_LOGIT_ABS = 1e4
"""Default bound on the magnitude of an edge logit (honest edges stay below 100)."""
MAX_NODE_KEY_LENGTH = 128

_INT64_MAX = np.iinfo(np.int64).max


class PayloadError(ValueError):
    """A client's payload is malformed; the message says what is wrong."""


def wire_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that features of feature dtype ``dtype`` travel in."""
    check_dtype_name(dtype)
    return _WIRE_NUMPY_DTYPE[dtype]


def check_dtype_name(dtype: str) -> None:
    """Raise PayloadError (a ValueError) unless ``dtype`` is one of
    :data:`FEATURE_DTYPES`."""
    if dtype not in FEATURE_DTYPES:
        raise PayloadError(
            f"unknown feature dtype {dtype!r}; expected one of {', '.join(FEATURE_DTYPES)}"
        )


@dataclass
class EncodedFeatures:
    """Features in a wire dtype, as numpy arrays ready for an ``ArrayRecord``."""

    dtype: str
    data: np.ndarray
    scale: np.ndarray | None = None  # int8 only: per-channel step, float32 (C,)
    offset: np.ndarray | None = None  # int8 only: per-channel minimum, float32 (C,)

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.scale, self.offset) if a is not None)
        return int(self.data.nbytes + extra)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"features": self.data}
        if self.scale is not None and self.offset is not None:
            out["feature_scale"] = self.scale
            out["feature_offset"] = self.offset
        return out


def encoded_digest(encoded: EncodedFeatures) -> str:
    """A digest of encoded features: their wire bytes and int8 code parameters.
    The server tells a node the digest of the features it holds for it; a node
    whose features have that digest sends none (they have not changed)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (encoded.data, encoded.scale, encoded.offset):
        if array is not None:
            digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()


def encode_features(features: Tensor, dtype: str) -> EncodedFeatures:
    """Encode ``N x C x H x W`` float features in the wire dtype ``dtype``."""
    check_dtype_name(dtype)
    x = features.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return EncodedFeatures(dtype, x.numpy())
    if dtype == "float16":
        return EncodedFeatures(dtype, x.to(torch.float16).numpy())
    if dtype == "bfloat16":
        return EncodedFeatures(dtype, x.to(torch.bfloat16).view(torch.int16).numpy())
    # int8: affine per channel
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    if per_channel.shape[1] == 0:
        lo = torch.zeros(x.shape[1])
        hi = torch.zeros(x.shape[1])
    else:
        lo, hi = per_channel.min(dim=1).values, per_channel.max(dim=1).values
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    q = torch.round((x - lo.view(shape)) / scale.view(shape)).clamp_(0, 255).to(torch.uint8)
    return EncodedFeatures(dtype, q.numpy(), scale.numpy(), lo.numpy())


def decode_features(encoded: EncodedFeatures) -> Tensor:
    """Widen encoded features back to a float32 tensor (a new one: read-only views of
    a message's bytes are copied, never written to)."""
    data = encoded.data
    if not (data.flags.writeable and data.flags.c_contiguous):
        data = np.array(data, order="C")
    return _widen(
        torch.from_numpy(data),
        encoded.dtype,
        None if encoded.scale is None else torch.from_numpy(encoded.scale),
        None if encoded.offset is None else torch.from_numpy(encoded.offset),
    )


def _widen(data: Tensor, dtype: str, scale: Tensor | None, offset: Tensor | None) -> Tensor:
    if dtype == "float32":
        return data.float()
    if dtype == "float16":
        return data.float()
    if dtype == "bfloat16":
        return data.view(torch.bfloat16).float()
    assert scale is not None and offset is not None
    shape = (1, -1) + (1,) * (data.dim() - 2)  # per channel: along dimension 1
    return data.float() * scale.view(shape) + offset.view(shape)


@dataclass
class FeaturePayload:
    """One client's upload for one round."""

    features: EncodedFeatures
    logits: np.ndarray  # N x K float32
    labels: np.ndarray  # N int64
    ids: np.ndarray  # N int64

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.logits.nbytes + self.labels.nbytes + self.ids.nbytes)


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


@dataclass
class _Entry:
    payload: FeaturePayload  # its features.data is in memory or memory-mapped
    round: int
    scale: Tensor | None = field(default=None, repr=False)
    offset: Tensor | None = field(default=None, repr=False)
    path: Path | None = None
    mapping: mmap.mmap | None = field(default=None, repr=False)

    def rows(self, index: np.ndarray) -> Tensor:
        """Rows ``index`` of the features, widened to float32 (reads only those rows)."""
        enc = self.payload.features
        data = torch.from_numpy(np.ascontiguousarray(enc.data[index]))  # a copy
        if self.mapping is not None and _MADV_DONTNEED is not None:
            # the rows are copied: unmap the file's pages from this process, so the
            # store's resident memory stays flat however large it grows (the data
            # stays in the OS page cache, which the OS can reclaim)
            self.mapping.madvise(_MADV_DONTNEED)
        return _widen(data, enc.dtype, self.scale, self.offset)


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _entry(
    payload: FeaturePayload, server_round: int, path: Path | None, mapping: mmap.mmap | None
) -> _Entry:
    enc = payload.features
    return _Entry(
        payload=payload,
        round=server_round,
        scale=None if enc.scale is None else torch.from_numpy(np.array(enc.scale)),
        offset=None if enc.offset is None else torch.from_numpy(np.array(enc.offset)),
        path=path,
        mapping=mapping,
    )


def _sidecar(path: Path) -> Path:
    """The ``.npz`` beside a stored upload's features file."""
    return path.with_suffix(".npz")


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap]:
    """A read-only memory map of the ``.npy`` file at ``path`` and the array over it."""
    with open(path, "rb") as file:
        header = read_npy_header(file)
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return header.view(mapping), mapping


@dataclass(frozen=True)
class NpyHeader:
    """What the header of a ``.npy`` file or buffer says about the array after it."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # where the data starts

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def view(self, buffer: Any) -> np.ndarray:
        """The array over ``buffer`` (the whole ``.npy`` bytes), without a copy."""
        count = int(np.prod(self.shape, dtype=np.int64))
        flat = np.frombuffer(buffer, dtype=self.dtype, count=count, offset=self.offset)
        return flat.reshape(self.shape, order="F" if self.fortran_order else "C")


def read_npy_header(stream: BinaryIO) -> NpyHeader:
    """Read a ``.npy`` header (format 1.0 or 2.0) from ``stream``; ValueError if it is
    none, or describes an object array."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return NpyHeader(tuple(shape), bool(fortran_order), dtype, stream.tell())


NodeKey = str
"""A node's stable key (see :func:`validate_node_key`)."""


def file_label(key: NodeKey) -> str:
    """A node key as a file-name part: itself when it is short and made of letters,
    digits, ``_`` and ``-``, else ``key-`` and a digest of it (no two keys share
    one)."""
    text = str(key)
    if 0 < len(text) <= 40 and all(c.isascii() and (c.isalnum() or c in "_-") for c in text):
        return text
    return "key-" + hashlib.sha256(text.encode()).hexdigest()[:24]


class Batch(NamedTuple):
    """One training batch of the store: float32 features, labels, the edge logits
    (KD targets) and, per row, the key of the node that uploaded it."""

    features: Tensor
    labels: Tensor
    edge_logits: Tensor
    owners: list[NodeKey]


class FeatureStore:
    """Features of every node, in their wire dtype, keyed by node key.

    A node's newer upload replaces its older one. Keys are the nodes' stable keys
    (strings chosen by the nodes); file names on disk never contain them. With
    ``directory`` set the features live in memory-mapped ``.npy`` files there and
    the rest of each upload (logits, labels, ids, int8 scales) in a ``.npz`` file
    beside them, so a federation whose features exceed RAM still trains (batches
    read just their rows) and a restarted server finds every stored node again
    (:meth:`state_dict` / :meth:`load_state_dict`). Without it they stay in memory
    and a checkpoint holds none of them.

    With checkpoints (``keep_retired``), the files of a replaced or dropped upload
    are deleted only once no kept checkpoint names them (:meth:`checkpointed`).

    Parameters
    ----------
    directory : str | Path | None (default: None)
        Folder for the stored uploads; ``None`` keeps them in memory.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[NodeKey, _Entry] = {}
        self._files = 0  # a counter for file names
        self.keep_retired = False
        self._retired: list[tuple[int, Path]] = []  # (checkpoints written by then, file)
        self._checkpoints = 0

    def put(self, node: NodeKey, payload: FeaturePayload, server_round: int) -> bool:
        """Store ``node``'s upload of ``server_round``, replacing its older one.

        A payload that reuses the stored features (:func:`validate_update`) only
        refreshes the node's logits and round (on disk: a new small ``.npz``, the
        features file linked under a new name); the features are not copied.
        Returns True in that case, False when new features were stored.
        """
        current = self._entries.get(node)
        if current is not None and payload.features is current.payload.features:
            current.payload = payload
            current.round = server_round
            if current.path is not None:
                current.path = self._relink(node, current.path, server_round)
                self._write_sidecar(current.path, payload)
            return True
        enc = payload.features
        path, mapping = None, None
        if self.directory is not None:
            path = self._new_path(node, server_round)
            write_atomic(path, lambda handle: np.save(handle, np.ascontiguousarray(enc.data)))
            self._write_sidecar(path, payload)
            mapped, mapping = _map_npy(path)
            payload = FeaturePayload(
                EncodedFeatures(enc.dtype, mapped, enc.scale, enc.offset),
                payload.logits,
                payload.labels,
                payload.ids,
            )
        self.remove(node)
        self._entries[node] = _entry(payload, server_round, path, mapping)
        return False

    def _new_path(self, node: NodeKey, server_round: int) -> Path:
        assert self.directory is not None
        self._files += 1
        return self.directory / f"node-{file_label(node)}-{self._files}-round-{server_round}.npy"

    def _relink(self, node: NodeKey, path: Path, server_round: int) -> Path:
        """The features file under a new name (a hard link, no copy), the old names
        retired: a kept checkpoint may still name them."""
        fresh = self._new_path(node, server_round)
        os.link(path, fresh)
        self._retire(path)
        self._retire(_sidecar(path))
        return fresh

    @staticmethod
    def _write_sidecar(path: Path, payload: FeaturePayload) -> None:
        """Everything of ``payload`` but the features, in the ``.npz`` beside ``path``."""
        enc = payload.features
        arrays = {
            "logits": payload.logits,
            "labels": payload.labels,
            "ids": payload.ids,
            "dtype": np.array(enc.dtype),
        }
        if enc.scale is not None and enc.offset is not None:
            arrays.update(scale=np.asarray(enc.scale), offset=np.asarray(enc.offset))
        write_atomic(_sidecar(path), lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]

    def _retire(self, path: Path) -> None:
        if self.keep_retired:
            self._retired.append((self._checkpoints, path))
        else:
            path.unlink(missing_ok=True)

    def checkpointed(self) -> None:
        """A checkpoint naming the current uploads was written: delete the files of
        uploads replaced or dropped before the previous checkpoint was written (of
        the checkpoints, the newest two are kept; neither names those)."""
        self._checkpoints += 1
        keep = []
        for written, path in self._retired:
            if written <= self._checkpoints - 2:
                path.unlink(missing_ok=True)
            else:
                keep.append((written, path))
        self._retired = keep

    def state_dict(self) -> dict[str, Any] | None:
        """Where each stored node's upload is (disk store), for a checkpoint; None
        for the memory store, whose uploads a checkpoint does not hold."""
        if self.directory is None:
            return None
        return {
            "entries": {
                key: {"path": str(entry.path), "round": entry.round}
                for key, entry in self._entries.items()
            },
            "files": self._files,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Find the uploads a checkpoint names again, and delete the files in the
        directory it does not name (uploads of a round the checkpoint does not
        hold). The memory store reads the named uploads in."""
        if not state:
            return
        for key in list(self._entries):
            self.remove(key)
        named: set[Path] = set()
        for key, where in state["entries"].items():
            path = Path(where["path"])
            named.update((path.resolve(), _sidecar(path).resolve()))
            with np.load(_sidecar(path)) as side:
                extra = {k: side[k] for k in side.files}
            mapping = None
            if self.directory is None:
                data: np.ndarray = np.load(path)
            else:
                data, mapping = _map_npy(path)
            features = EncodedFeatures(
                str(extra["dtype"]), data, extra.get("scale"), extra.get("offset")
            )
            payload = FeaturePayload(features, extra["logits"], extra["labels"], extra["ids"])
            self._entries[str(key)] = _entry(payload, int(where["round"]), path, mapping)
        if self.directory is not None:
            self._files = max(self._files, int(state.get("files", 0)))
            for path in self.directory.glob("node-*-round-*.np[yz]"):
                if path.resolve() not in named:
                    path.unlink(missing_ok=True)

    def remove(self, node: NodeKey) -> None:
        entry = self._entries.pop(node, None)
        if entry is not None and entry.path is not None:
            self._retire(entry.path)
            self._retire(_sidecar(entry.path))

    def __contains__(self, node: object) -> bool:
        return node in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def nodes(self) -> list[NodeKey]:
        return sorted(self._entries)

    def payload(self, node: NodeKey) -> FeaturePayload:
        return self._entries[node].payload

    def last_round(self, node: NodeKey) -> int:
        return self._entries[node].round

    @property
    def num_samples(self) -> int:
        return sum(e.payload.num_samples for e in self._entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes held at rest (features in wire dtype plus logits, labels, ids)."""
        return sum(e.payload.nbytes for e in self._entries.values())

    def node_features(self, node: NodeKey) -> Tensor:
        """All of one node's features, widened to float32."""
        entry = self._entries[node]
        return entry.rows(np.arange(entry.payload.num_samples))

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        nodes: list[NodeKey] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches (:class:`Batch`) over the nodes' samples.

        Samples are shuffled across all nodes when ``generator`` is given (in a
        fixed order otherwise); features are widened to float32 one batch at a time.
        """
        keys = self.nodes() if nodes is None else list(nodes)
        # Order nodes by their smallest sample id, which is stable across runs (node
        # ids are not), so that a seeded run shuffles the same way every time.
        keys.sort(key=lambda k: (int(self._entries[k].payload.ids.min()), k))
        entries = [self._entries[k] for k in keys]
        sizes = torch.tensor([e.payload.num_samples for e in entries], dtype=torch.long)
        if len(entries) == 0:
            return
        offsets = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        order = (
            torch.randperm(total, generator=generator)
            if generator is not None
            else torch.arange(total)
        )
        labels = [torch.from_numpy(e.payload.labels) for e in entries]
        logits = [torch.from_numpy(e.payload.logits) for e in entries]
        for start in range(0, total, batch_size):
            idx = order[start : start + batch_size]
            owner = torch.searchsorted(offsets, idx, right=True) - 1
            feats, labs, logs, positions = [], [], [], []
            for k in torch.unique(owner).tolist():
                mask = owner == k
                rows = idx[mask] - offsets[k]
                feats.append(entries[k].rows(rows.numpy()))
                labs.append(labels[k][rows])
                logs.append(logits[k][rows])
                positions.append(torch.nonzero(mask).flatten())
            # restore the shuffled order inside the batch
            inverse = torch.empty(len(idx), dtype=torch.long)
            inverse[torch.cat(positions)] = torch.arange(len(idx))
            yield Batch(
                torch.cat(feats)[inverse],
                torch.cat(labs)[inverse],
                torch.cat(logs)[inverse],
                [keys[k] for k in owner.tolist()],
            )
