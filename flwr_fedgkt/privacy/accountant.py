"""The privacy a node's feature uploads spend, counted release by release.

A *release* of a sample is one upload of its feature map: every round in which
the node sends its training features (each round it trains, unless the server
already holds them), and every upload of its test features. Each release is the
Gaussian mechanism with noise multiplier ``feature-noise`` over the sample's
clipped feature map (sensitivity ``feature-clip``, add/remove-one-sample
neighbours). A node's training and test samples are disjoint, so a node spends
the larger of what its training samples and its test samples spent; the run's
figure is its worst node's.

The Gaussian mechanisms compose exactly into one (:func:`gaussian_epsilon`),
whose delta for each epsilon comes from Google's ``dp-accounting`` (its exact
Gaussian privacy loss). Releases with no noise (a multiplier of 0) spend an
unbounded epsilon.

This module imports no Flower code.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

__all__ = ["DEFAULT_DELTA", "gaussian_epsilon", "ReleaseLedger"]

DEFAULT_DELTA = 1e-5
"""The delta at which epsilon is reported (well below 1 / the samples of a node)."""


def gaussian_epsilon(releases: Iterable[tuple[float, int]], delta: float = DEFAULT_DELTA) -> float:
    """Epsilon at ``delta`` of the composition of Gaussian mechanisms given as
    ``(noise multiplier, count)`` pairs; ``inf`` when a release had no noise, 0
    for no release.

    Gaussian mechanisms compose exactly into one Gaussian mechanism whose
    multiplier is ``(sum of count / multiplier^2)^(-1/2)`` (their privacy-loss
    distributions are Gaussian); its delta for a given epsilon is
    ``dp-accounting``'s exact Gaussian privacy loss, and epsilon is found by
    bisection. (Its discretised PLD accountant runs out of memory for the tiny
    multipliers that features need to stay useful: the loss spans 1 / sigma^2.)"""
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    releases = [(float(z), int(k)) for z, k in releases if int(k) > 0]
    if not releases:
        return 0.0
    if any(z <= 0 for z, _ in releases):
        return math.inf
    multiplier = sum(k / z**2 for z, k in releases) ** -0.5
    loss = GaussianPrivacyLoss(standard_deviation=multiplier, sensitivity=1.0)
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, 2 * high
    for _ in range(100):  # to a relative precision far below the figures' digits
        middle = (low + high) / 2
        low, high = (middle, high) if loss.get_delta_for_epsilon(middle) > delta else (low, middle)
    return high


class ReleaseLedger:
    """Releases per node key and split (``train`` / ``test``), each with its
    noise multiplier; checkpointed as a plain dict (:meth:`state`)."""

    def __init__(self, delta: float = DEFAULT_DELTA) -> None:
        self.delta = delta
        # node key -> split -> noise multiplier -> releases
        self.releases: dict[str, dict[str, Counter[float]]] = {}
        self._cache: dict[tuple, float] = {}

    def record(self, node: str, split: str, noise: float) -> None:
        """One release of ``node``'s ``split`` with noise multiplier ``noise``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.releases.setdefault(node, {}).setdefault(split, Counter())[float(noise)] += 1

    def count(self, node: str, split: str = "train") -> int:
        """How many times ``node`` released its ``split``."""
        return sum(self.releases.get(node, {}).get(split, Counter()).values())

    def epsilon(self, node: str) -> float:
        """What ``node`` spent: the larger of its training and its test samples'."""
        spent = 0.0
        for counts in self.releases.get(node, {}).values():
            key = tuple(sorted(counts.items()))
            if key not in self._cache:
                self._cache[key] = gaussian_epsilon(key, self.delta)
            spent = max(spent, self._cache[key])
        return spent

    def worst(self) -> float | None:
        """The largest epsilon any node spent; None before any release."""
        if not self.releases:
            return None
        return max(self.epsilon(node) for node in self.releases)

    def state(self) -> dict:
        return {
            node: {split: {str(z): k for z, k in c.items()} for split, c in splits.items()}
            for node, splits in self.releases.items()
        }

    def load_state(self, state: dict) -> None:
        self.releases = {
            str(node): {
                str(split): Counter({float(z): int(k) for z, k in counts.items()})
                for split, counts in splits.items()
            }
            for node, splits in state.items()
        }
        self._cache.clear()
