"""What a node applies before anything leaves it, and what it spent doing so.

:class:`Defences` are a node's settings (``feature-noise``, ``feature-clip``,
``label-epsilon``, ``nopeek-weight``); :meth:`Defences.at_least` combines them
with what a server asks for (more protection, never less); :func:`release`
applies them to an extraction: features clipped and noised, labels through
randomized response. The noise and the label flips are drawn from a secret the
node keeps in its edge state (never from the run's seed, which the server
knows and could replay): labels are drawn once per sample and split, so that
sending them again reveals nothing new; feature noise is drawn once per sample
and split while the extractor stays frozen (the same noisy features, which the
server then already holds), and afresh for every other release.

This package imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .accountant import DEFAULT_DELTA, ReleaseLedger, gaussian_epsilon
from .mechanisms import (
    clip_features,
    corrected_cross_entropy,
    debiased_accuracy,
    distance_correlation,
    keep_probability,
    randomized_response,
    release_features,
)

__all__ = [
    "DEFAULT_DELTA",
    "Defences",
    "PRESETS",
    "ReleaseLedger",
    "clip_features",
    "corrected_cross_entropy",
    "debiased_accuracy",
    "distance_correlation",
    "gaussian_epsilon",
    "keep_probability",
    "randomized_response",
    "release",
    "release_features",
    "secret_generator",
]

META_KEYS = {
    "feature_noise": "privacy-feature-noise",
    "feature_clip": "privacy-feature-clip",
    "label_epsilon": "privacy-label-epsilon",
    "nopeek_weight": "privacy-nopeek-weight",
}
"""The reply metrics (and round-config keys) that carry each defence."""
LIMITS = {"feature_noise": 1e4, "feature_clip": 1e9, "label_epsilon": 100.0, "nopeek_weight": 1e3}
"""The largest value of each defence a node or a run config may give."""
MIN_LABEL_EPSILON = 0.01
"""The smallest label epsilon in force (0 is off)."""


@dataclass(frozen=True)
class Defences:
    """A node's defences, all off by default.

    Parameters
    ----------
    feature_noise : float (default: 0.0)
        Gaussian noise on each uploaded feature map, as a multiple of
        ``feature_clip`` (the noise multiplier of the Gaussian mechanism).
    feature_clip : float (default: 0.0)
        Each sample's feature map is scaled down to this L2 norm before the noise
        (0: not clipped; noise needs a clip).
    label_epsilon : float (default: 0.0)
        Labels sent through randomized response with this epsilon (0: sent as
        they are).
    nopeek_weight : float (default: 0.0)
        Weight of the distance correlation between a batch's images and their
        features in the edge's training loss (NoPeek; 0: off).
    """

    feature_noise: float = 0.0
    feature_clip: float = 0.0
    label_epsilon: float = 0.0
    nopeek_weight: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            key = field.name.replace("_", "-")
            top = LIMITS[field.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} = {value!r} is not a number")
            if not (math.isfinite(value) and 0 <= value <= top):
                raise ValueError(f"{key} = {value!r} must lie in [0, {top:g}]")
        if 0 < self.label_epsilon < MIN_LABEL_EPSILON:
            raise ValueError(
                f"label-epsilon = {self.label_epsilon!r} must be 0 (off) or at least "
                f"{MIN_LABEL_EPSILON:g} (below it a label is kept with probability 1/K: noise)"
            )
        if self.feature_noise > 0 and self.feature_clip <= 0:
            raise ValueError(
                f"feature-noise = {self.feature_noise} needs feature-clip > 0: noise bounds "
                "what a sample reveals only once its norm is bounded"
            )

    @property
    def active(self) -> list[str]:
        """The names (run-config keys) of the defences in force."""
        return [
            key.replace("_", "-")
            for key in ("feature_noise", "feature_clip", "label_epsilon", "nopeek_weight")
            if getattr(self, key) > 0
        ]

    @classmethod
    def preset(cls, name: str) -> Defences:
        """The defences of a named preset (the run config's ``privacy``):
        :data:`PRESETS`; ValueError names the presets there are."""
        if name not in PRESETS:
            raise ValueError(f"privacy = {name!r}: expected one of {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def over_preset(
        cls,
        preset: str,
        feature_noise: float = 0.0,
        feature_clip: float = 0.0,
        label_epsilon: float = 0.0,
        nopeek_weight: float = 0.0,
    ) -> Defences:
        """These defences raised to the preset named ``preset`` where it asks for
        more (the clip is the one given, else the preset's)."""
        floor = cls.preset(preset)
        own = cls(feature_noise, feature_clip or floor.feature_clip, label_epsilon, nopeek_weight)
        return own.at_least(floor)

    def at_least(self, asked: Defences) -> Defences:
        """These defences, raised where ``asked`` (a server's request) asks for
        more protection: more noise, a label epsilon (a smaller one), a larger
        NoPeek weight; the clip is this node's own unless it has none and noise is
        asked for. Nothing ``asked`` can lower a defence."""
        epsilons = [e for e in (self.label_epsilon, asked.label_epsilon) if e > 0]
        noise = max(self.feature_noise, asked.feature_noise)
        clip = self.feature_clip if self.feature_clip > 0 else asked.feature_clip
        return Defences(
            feature_noise=noise,
            feature_clip=clip,
            label_epsilon=min(epsilons) if epsilons else 0.0,
            nopeek_weight=max(self.nopeek_weight, asked.nopeek_weight),
        )

    def covers(self, asked: Defences) -> bool:
        """Whether these defences give at least the protection ``asked`` for."""
        if self.feature_noise < asked.feature_noise or self.nopeek_weight < asked.nopeek_weight:
            return False
        if asked.feature_clip > 0 and self.feature_clip <= 0:
            return False
        return not asked.label_epsilon or 0 < self.label_epsilon <= asked.label_epsilon

    def meta(self) -> dict[str, float]:
        """The defences as reply metrics (:data:`META_KEYS`), those in force only."""
        return {
            META_KEYS[key]: float(getattr(self, key)) for key in META_KEYS if getattr(self, key) > 0
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Defences:
        """The defences a reply's metrics (or a round config) name; ValueError
        names a value that is not a finite number >= 0."""
        values = {}
        for key, name in META_KEYS.items():
            raw = meta.get(name, 0.0)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise ValueError(f"{name} = {raw!r} is not a number")
            values[key] = float(raw)
        return cls(**values)


PRESETS: dict[str, Defences] = {
    "none": Defences(),
    "recommended": Defences(feature_noise=0.005, feature_clip=50.0, label_epsilon=4.0),
}
"""The named defences of the run config's ``privacy``. ``recommended`` is the
setting measured in ``benchmarks/privacy.py`` (on digits with the built-in
ResNet-8 stem, whose features have an L2 norm of about 50: with a model of
your own, set ``feature-clip`` to the typical norm of its features)."""


def secret_generator(secret: int, *parts: object) -> torch.Generator:
    """A generator seeded from a node's ``secret`` and ``parts`` (what is drawn,
    for which split and release), the same in every process."""
    text = ":".join(str(p) for p in (secret, *parts)).encode()
    seed = int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def release(
    features: torch.Tensor,
    labels: torch.Tensor,
    defences: Defences,
    num_classes: int,
    secret: int,
    split: str,
    release_key: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of a split as they may leave the node under
    ``defences``: features clipped and noised (the noise drawn for
    ``(secret, split, release_key)``: pass the same key for the same features,
    e.g. 0 while the extractor is frozen, and a new one for each new release),
    labels through randomized response (drawn for ``(secret, split)`` alone:
    a sample's noisy label never changes)."""
    if defences.feature_clip > 0:
        generator = secret_generator(secret, "features", split, release_key)
        features = release_features(
            features, defences.feature_clip, defences.feature_noise, generator
        )
    if defences.label_epsilon > 0:
        generator = secret_generator(secret, "labels", split)
        labels = randomized_response(labels, defences.label_epsilon, num_classes, generator)
    return features, labels
