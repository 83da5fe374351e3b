"""Checks of one node's upload against what the other nodes send.

* :class:`FederationRange`: features (per channel) and edge logits far above the
  other nodes' are refused. A node's range is the largest magnitude per channel
  of its newest upload; a reply is out of range when a channel exceeds
  :data:`FACTOR` times the median, over the other nodes, of that channel's range
  (channels near zero get :data:`RELATIVE_FLOOR` of the largest channel's median).
  The replies of a round are screened together, each against all other nodes
  (this round's and those held from earlier rounds), so that a hostile first reply
  does not set the scale. With fewer than two other nodes nothing is refused here
  (``max-feature-abs`` and ``max-logit-abs`` still hold).

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codec import FeaturePayload, NodeKey, decode_features

__all__ = [
    "FACTOR",
    "RELATIVE_FLOOR",
    "FederationRange",
    "PayloadRange",
    "payload_range",
    "range_of",
]

FACTOR = 8.0
"""How many times the other nodes' median range a node's features or logits may
reach. Honest nodes of one federation differed by at most 2.86x per channel at
initialisation (``benchmarks/honest_range.py``: ResNet-8 stems of their own on
digits 2.86x, one shared 1.11x; the quickstart Net's extractor 1.08x, the MLP's
2.83x)."""
RELATIVE_FLOOR = 0.05
"""A channel's reference is at least this share of the largest channel's."""
NOISE_SIGMAS = 8.0
"""Standard deviations of declared feature noise a feature value may reach: the
chance that one of 10^12 Gaussian draws exceeds 8 of them is about 10^-3."""


@dataclass(frozen=True)
class PayloadRange:
    """The largest magnitude per feature channel, and of the edge logits (None:
    the upload has none)."""

    features: np.ndarray
    logits: float | None


def payload_range(payload: FeaturePayload) -> PayloadRange:
    """The range of one upload (:func:`range_of` its decoded features)."""
    return range_of(decode_features(payload.features), payload.logits)


def range_of(decoded: torch.Tensor, logits: np.ndarray | None) -> PayloadRange:
    """The range of an upload's decoded features (channels: the first dimension
    after the samples) and of its edge logits."""
    features = decoded.float().abs()
    if features.ndim == 1:
        features = features[:, None]
    channels = features.transpose(0, 1).reshape(features.shape[1], -1)
    per_channel = channels.amax(dim=1).double().numpy() if channels.numel() else np.zeros(0)
    largest = float(np.abs(logits).max()) if logits is not None and logits.size else None
    return PayloadRange(per_channel, largest)


def noise_bound(defences: Any) -> float | None:
    """The largest feature magnitude that a node's declared clip and noise
    explain (None: it declared no noise): a clipped element is at most the clip
    itself, and Gaussian noise of standard deviation ``noise * clip`` stays below
    :data:`NOISE_SIGMAS` of them in any upload a server can hold."""
    if defences is None or not defences.feature_noise > 0:
        return None
    return defences.feature_clip * (1.0 + NOISE_SIGMAS * defences.feature_noise)


def _outside(
    mine: PayloadRange,
    others: list[PayloadRange],
    factor: float,
    explained: float | None = None,
) -> str | None:
    """Why ``mine`` is far outside ``others`` (None: it is not); features up to
    ``explained`` (the declared noise's bound) are taken whatever the others send."""
    same = [o for o in others if o.features.shape == mine.features.shape]
    noise_explains = explained is not None and float(mine.features.max(initial=0.0)) <= explained
    if len(same) >= 2 and mine.features.size and not noise_explains:
        reference = np.median(np.stack([o.features for o in same]), axis=0)
        floor = RELATIVE_FLOOR * float(reference.max())
        limit = factor * np.maximum(reference, floor)
        if floor > 0 and (mine.features > limit).any():
            ratio = mine.features / np.maximum(reference, floor)
            channel = int(np.argmax(ratio))
            return (
                f"features up to {mine.features[channel]:.4g} in channel {channel}, "
                f"{ratio[channel]:.0f}x the other nodes' median ({reference[channel]:.4g}); "
                f"at most {factor:g}x is taken"
            )
    logits = [o.logits for o in others if o.logits is not None]
    if mine.logits is not None and len(logits) >= 2:
        reference_logit = max(float(np.median(logits)), 1.0)
        if mine.logits > factor * reference_logit:
            return (
                f"edge logits up to {mine.logits:.4g}, {mine.logits / reference_logit:.0f}x "
                f"the other nodes' median ({reference_logit:.4g}); at most {factor:g}x is taken"
            )
    return None


class FederationRange:
    """The newest range of every node key's uploads, by split, and the screen of a
    round's replies against them.

    Parameters
    ----------
    factor : float (default: FACTOR)
        How far above the other nodes' median range a reply may reach.
    """

    def __init__(self, factor: float = FACTOR) -> None:
        self.factor = factor
        self.ranges: dict[tuple[NodeKey, str], PayloadRange] = {}

    def screen(self, replies: Iterable[Any], split: str) -> tuple[list[Any], list[tuple[Any, str]]]:
        """The replies (with ``key``, ``payload``, ``digest`` and ``span``: their
        range as validation measured it, None to measure it here) that stay, and
        the ones far outside the other nodes' range, each with its reason. Replies
        that sent no features (unchanged) stay; the kept ones' ranges are kept."""
        replies = list(replies)
        fresh = {
            r.key: r.span if r.span is not None else payload_range(r.payload)
            for r in replies
            if r.digest is not None
        }
        held = {k: v for (k, s), v in self.ranges.items() if s == split}
        everyone = {**held, **fresh}
        kept, refused = [], []
        for reply in replies:
            mine = fresh.get(reply.key) if reply.digest is not None else None
            others = [v for k, v in everyone.items() if k != reply.key]
            explained = noise_bound(getattr(reply, "defences", None))
            reason = None if mine is None else _outside(mine, others, self.factor, explained)
            if reason is None:
                kept.append(reply)
                if mine is not None:
                    self.ranges[(reply.key, split)] = mine
            else:
                refused.append((reply, reason))
        return kept, refused

    def state_dict(self) -> dict[str, Any]:
        return {
            f"{split}/{key}": (r.features.tolist(), r.logits)
            for (key, split), r in self.ranges.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ranges = {}
        for name, (features, logits) in state.items():
            split, key = str(name).split("/", 1)
            self.ranges[(key, split)] = PayloadRange(np.asarray(features, np.float64), logits)
