"""Sketches of each sample's features, to tell near-copies of another node's
uploads from independent ones: 64-bit random-hyperplane (SimHash) sketches, which a
node registry keeps (:class:`~flwr_fedgkt.registry.NodeRegistry`).

This module imports no Flower code.
"""

from __future__ import annotations

import numpy as np
import torch

from .codec import FeaturePayload, decode_features

__all__ = ["SKETCH_BITS", "sample_sketches", "sketches_of"]

SKETCH_BITS = 64

_PLANES: dict[int, torch.Tensor] = {}


def sample_sketches(payload: FeaturePayload) -> np.ndarray:
    """One 64-bit sketch per sample of ``payload`` (:func:`sketches_of` its decoded
    features)."""
    return sketches_of(decode_features(payload.features))


def sketches_of(decoded: torch.Tensor) -> np.ndarray:
    """One 64-bit sketch per sample of these decoded features: the signs of its
    features' projections on 64 fixed random directions (the same for every run
    and node). Two samples whose features nearly agree share their sketch;
    independent samples almost never do (measured in the tests)."""
    features = decoded.float().reshape(len(decoded), -1)
    width = features.shape[1]
    if width not in _PLANES:
        generator = torch.Generator().manual_seed(width)
        _PLANES[width] = torch.randn(width, SKETCH_BITS, generator=generator)
    centred = features - features.mean(dim=1, keepdim=True)  # per sample: scale-free
    bits = (centred @ _PLANES[width] > 0).numpy().astype(np.uint64)
    weights = np.left_shift(np.uint64(1), np.arange(SKETCH_BITS, dtype=np.uint64))
    return (bits * weights).sum(axis=1).astype(np.uint64)
