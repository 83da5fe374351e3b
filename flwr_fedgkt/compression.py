"""Lossless compression of the uploaded feature bytes.

The server says which codec a round uses (``compression`` in the round's config);
a reply says which one it used (``compression`` in its ``meta``, ``none`` when
absent), either ``none`` or the round's. With ``zstd`` the reply's ``features``
array is the Zstandard frame of the wire-dtype feature bytes (C order), as a 1-D
``uint8`` array; the array's shape follows from the sample ids and the feature
shape the server validates against.

Inflating is bounded before it starts: a frame must declare its content size in
its header, and that size must be exactly the bytes its samples' features take
(``N x prod(feature shape) x itemsize``); libzstd then decodes into a buffer of
that size and fails rather than write past it. A frame that would inflate beyond
the bound is rejected without being inflated (a decompression bomb costs the
server the bytes it sent, nothing more).

This module imports no Flower code.
"""

from __future__ import annotations

import numpy as np

from .codec import PayloadError

__all__ = ["COMPRESSIONS", "CompressionError", "compress", "inflate", "check_compression"]

COMPRESSIONS = ("none", "zstd")
"""Codecs of the uploaded feature bytes."""

ZSTD_LEVEL = 3
"""Zstandard's default level: fast, and within a few per cent of the higher
levels' ratio on edge features (``benchmarks/compression.py``)."""


class CompressionError(PayloadError):
    """Compressed bytes that cannot be, or may not be, inflated (a PayloadError:
    the reply that carries them is rejected)."""


def check_compression(codec: str) -> None:
    """Raise CompressionError unless ``codec`` is one of :data:`COMPRESSIONS`."""
    if codec not in COMPRESSIONS:
        raise CompressionError(
            f"unknown compression {codec!r}; expected one of {', '.join(COMPRESSIONS)}"
        )


def compress(data: np.ndarray, codec: str) -> np.ndarray:
    """``data``'s bytes (C order) compressed with ``codec``, as a 1-D ``uint8``
    array (``none``: ``data`` itself)."""
    check_compression(codec)
    if codec == "none":
        return data
    import zstandard

    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(raw.data)
    return np.frombuffer(frame, dtype=np.uint8)


def inflate(blob: np.ndarray, codec: str, expected_nbytes: int) -> bytes:
    """The bytes that ``blob`` (a 1-D ``uint8`` array of ``codec``) holds, which
    must be exactly ``expected_nbytes``; checked before anything is inflated.

    Raises
    ------
    CompressionError
        Naming what is wrong: not a 1-D uint8 array, not a frame, no declared
        content size, a declared size other than ``expected_nbytes``, corrupt data.
    """
    check_compression(codec)
    if codec == "none":
        raise CompressionError("nothing to inflate: the bytes are not compressed")
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CompressionError(
            f"compressed features must be a 1-D uint8 array, got shape {tuple(blob.shape)} "
            f"and dtype {blob.dtype}"
        )
    import zstandard

    data = blob.tobytes()
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as err:
        raise CompressionError(f"not a zstd frame: {err}") from None
    if declared < 0:
        raise CompressionError("the zstd frame does not declare its content size")
    if declared != expected_nbytes:
        raise CompressionError(
            f"the zstd frame declares {declared} bytes, but its samples' features take "
            f"{expected_nbytes}; not inflated"
        )
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_nbytes)
    except zstandard.ZstdError as err:
        raise CompressionError(f"corrupt zstd frame: {err}") from None
    if len(out) != expected_nbytes:
        raise CompressionError(
            f"the zstd frame inflated to {len(out)} bytes, not {expected_nbytes}"
        )
    return out
