"""The wire codec of edge features: dtypes, encoding and decoding, payloads.

A client's upload is a :class:`FeaturePayload`: its split's feature maps in a
compact *wire dtype*, its edge logits, labels and sample ids. The server keeps
features at rest in the wire dtype and widens them to float32 one batch at a time
(:meth:`flwr_fedgkt.store.FeatureStore.batches`).

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
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FEATURE_DTYPES",
    "PayloadError",
    "EncodedFeatures",
    "FeaturePayload",
    "NodeKey",
    "NpyHeader",
    "encode_features",
    "encoded_digest",
    "decode_features",
    "check_dtype_name",
    "read_npy_header",
    "widen",
    "wire_dtype",
]

FEATURE_DTYPES = ("float32", "float16", "bfloat16", "int8")

_WIRE_NUMPY_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.int16),
    "int8": np.dtype(np.uint8),
}


NodeKey = str
"""A node's stable key (see :func:`validate_node_key`)."""


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
    return widen(
        torch.from_numpy(data),
        encoded.dtype,
        None if encoded.scale is None else torch.from_numpy(encoded.scale),
        None if encoded.offset is None else torch.from_numpy(encoded.offset),
    )


def widen(data: Tensor, dtype: str, scale: Tensor | None, offset: Tensor | None) -> Tensor:
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
