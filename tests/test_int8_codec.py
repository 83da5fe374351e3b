"""The int8 feature codec keeps every value within half a step of its channel's range.

The bound is taken from the data itself: a channel whose values span
``[min_c, max_c]`` has 256 levels over that span, so each decoded value lies within
``(max_c - min_c) / 255 / 2`` of the original (plus float32 rounding). The data has
a distinct, non-zero offset and a distinct range per channel, so a decoder that
drops the offset, or a codec that uses one channel's (or a coarser) step for
another, is caught. The bound never comes from the encoder's own ``scale``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_fedgkt.codec import decode_features, encode_features
from flwr_fedgkt.records import arrays_record, record_arrays
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

SHAPE = (16, 8, 8)
NUM_CLASSES = 10


def _features(n: int = 8) -> torch.Tensor:
    """Values of channel c span [low_c, low_c + width_c]: low_c from -5 up in
    steps of 1.7 (never 0), width_c from 0.5 up in steps of 0.9."""
    channels = SHAPE[0]
    low = -5.0 + 1.7 * torch.arange(channels, dtype=torch.float32)
    width = 0.5 + 0.9 * torch.arange(channels, dtype=torch.float32)
    assert bool((low != 0).all())
    u = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0))
    u[0, :, 0, 0], u[-1, :, -1, -1] = 0.0, 1.0  # each channel reaches both ends
    return low.view(1, -1, 1, 1) + width.view(1, -1, 1, 1) * u


def _allowed_error(x: torch.Tensor) -> torch.Tensor:
    """Half a step of each channel's own range, plus float32 rounding, as (1, C, 1, 1)."""
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    span = per_channel.max(dim=1).values - per_channel.min(dim=1).values
    rounding = 4 * torch.finfo(torch.float32).eps * float(x.abs().max())
    return (span / 255 / 2 + rounding).view(1, -1, 1, 1)


def _assert_within_bound(decoded: torch.Tensor, x: torch.Tensor) -> None:
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    error = (decoded.double() - x.double()).abs()
    allowed = _allowed_error(x)
    worst = (error / allowed).amax(dim=(0, 2, 3))
    assert bool((worst <= 1.0).all()), (
        "int8 error beyond half a step of the channel's range: worst error / bound per "
        f"channel {[round(float(w), 2) for w in worst]}"
    )


def test_int8_round_trip_stays_within_half_a_step_of_each_channels_range() -> None:
    # Prepare
    x = _features()
    # Execute
    decoded = decode_features(encode_features(x, "int8"))
    # Assert
    _assert_within_bound(decoded, x)


def test_int8_features_decoded_on_the_server_stay_within_the_bound() -> None:
    # Prepare: an upload as a node sends it, read back as the server reads it
    x = _features()
    n = x.shape[0]
    arrays = encode_features(x, "int8").arrays()
    arrays.update(
        logits=np.zeros((n, NUM_CLASSES), np.float32),
        labels=np.arange(n, dtype=np.int64) % NUM_CLASSES,
        ids=np.arange(40, 40 + n, dtype=np.int64),
    )
    received = record_arrays(arrays_record(arrays), views=("features",))
    # Execute
    payload = validate_payload(received, "int8", SHAPE, NUM_CLASSES)
    decoded = decode_features(payload.features)
    # Assert
    _assert_within_bound(decoded, x)


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_int8_features_read_from_the_store_stay_within_the_bound(tmp_path, on_disk) -> None:
    # Prepare: the features as the server trains on them, batch by batch
    x = _features()
    n = x.shape[0]
    arrays = encode_features(x, "int8").arrays()
    arrays.update(
        logits=np.zeros((n, NUM_CLASSES), np.float32),
        labels=np.arange(n, dtype=np.int64) % NUM_CLASSES,
        ids=np.arange(n, dtype=np.int64),
    )
    store = FeatureStore(tmp_path / "store" if on_disk else None)
    store.put("node", validate_payload(arrays, "int8", SHAPE, NUM_CLASSES), server_round=1)
    # Execute: unshuffled batches keep the upload's order
    decoded = torch.cat([batch.features for batch in store.batches(3)])
    # Assert
    _assert_within_bound(decoded, x)
