"""What a node can do to its uploads before they leave it, and what the server
does to learn from them all the same.

- :func:`clip_features` and :func:`release_features`: each sample's feature map
  clipped to an L2 norm, then Gaussian noise of standard deviation ``noise *
  clip`` added (the Gaussian mechanism; ``clip`` bounds what one sample can
  change, so ``noise`` is the noise multiplier an accountant takes).
- :func:`randomized_response`: each label kept with probability
  :func:`keep_probability` (``e^eps / (e^eps + K - 1)``) and otherwise replaced by
  one of the other ``K - 1`` classes, uniformly: epsilon-label differential
  privacy for one release.
- :func:`corrected_cross_entropy`: the server's cross-entropy against labels that
  went through randomized response, with the known flip probability folded into
  the model's prediction (forward correction, Patrini et al., CVPR 2017), and
  :func:`debiased_accuracy`, the accuracy on true labels estimated from the
  agreement with noisy ones.
- :func:`distance_correlation`: the sample distance correlation of a batch's
  inputs and features (Szekely et al., 2007), NoPeek's penalty (Vepakomma et
  al., 2020).

This module imports no Flower code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "clip_features",
    "release_features",
    "keep_probability",
    "randomized_response",
    "corrected_cross_entropy",
    "debiased_accuracy",
    "distance_correlation",
]


def clip_features(features: Tensor, clip: float) -> Tensor:
    """Each sample (row) of ``features`` scaled down to an L2 norm of at most
    ``clip`` (rows already within it are unchanged); float32."""
    if clip <= 0:
        raise ValueError(f"the clipping norm must be positive, got {clip}")
    flat = features.float().reshape(len(features), -1)
    norms = flat.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    return (flat * scale).reshape(features.shape)


def release_features(
    features: Tensor, clip: float, noise: float, generator: torch.Generator
) -> Tensor:
    """``features`` as they may leave the node: clipped per sample to ``clip``
    (:func:`clip_features`), then Gaussian noise of standard deviation
    ``noise * clip`` added to every element, drawn from ``generator``.
    ``clip = 0`` (no clipping) is allowed only with ``noise = 0``: without a
    bound on a sample's norm, no amount of noise bounds what it reveals."""
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"the noise multiplier must be finite and >= 0, got {noise}")
    if clip <= 0:
        if noise > 0:
            raise ValueError("feature noise needs a clipping norm (feature-clip > 0)")
        return features.float()
    clipped = clip_features(features, clip)
    if noise == 0:
        return clipped
    draw = torch.randn(clipped.shape, generator=generator, dtype=torch.float32)
    return clipped + draw * (noise * clip)


def keep_probability(epsilon: float, num_classes: int) -> float:
    """The probability that randomized response with ``epsilon`` over
    ``num_classes`` classes keeps a label: ``e^eps / (e^eps + K - 1)``; 1.0
    when ``epsilon`` is infinite (no defence)."""
    if num_classes < 2:
        raise ValueError(f"randomized response needs two classes or more, got {num_classes}")
    if not epsilon > 0:
        raise ValueError(f"label epsilon must be positive, got {epsilon}")
    if math.isinf(epsilon):
        return 1.0
    # e^eps / (e^eps + K - 1), written so that a large epsilon does not overflow
    return 1.0 / (1.0 + (num_classes - 1) * math.exp(-epsilon))


def randomized_response(
    labels: Tensor, epsilon: float, num_classes: int, generator: torch.Generator
) -> Tensor:
    """``labels`` through K-ary randomized response: each kept with
    :func:`keep_probability`, else replaced by one of the other classes, each
    equally likely (draws from ``generator``)."""
    labels = labels.long()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    keep = keep_probability(epsilon, num_classes)
    flip = torch.rand(labels.shape, generator=generator) >= keep
    # a shift of 1..K-1 classes: uniform over the K - 1 other labels
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return torch.where(flip, (labels + shift) % num_classes, labels)


def _flip_matrix(keep: Tensor, num_classes: int) -> Tensor:
    """``B x K x K`` transition matrices ``P(noisy = j | true = i)`` for per-sample
    keep probabilities ``keep`` (``B``)."""
    off = (1.0 - keep) / (num_classes - 1)
    eye = torch.eye(num_classes, device=keep.device, dtype=keep.dtype)
    return off.view(-1, 1, 1) + (keep - off).view(-1, 1, 1) * eye


def corrected_cross_entropy(logits: Tensor, noisy_labels: Tensor, keep: Tensor | float) -> Tensor:
    """Mean cross-entropy of ``noisy_labels`` under the model's prediction pushed
    through the randomized response that made them: ``-log (softmax(logits) T)[y]``
    with ``T[i, j] = keep`` on the diagonal and ``(1 - keep) / (K - 1)`` off it
    (``keep`` per sample or one for all). With ``keep = 1`` it is the plain
    cross-entropy; its minimiser over the noisy labels is the true class
    distribution, as long as ``keep > 1 / K``."""
    num_classes = logits.shape[1]
    keep_t = torch.as_tensor(keep, dtype=torch.float32, device=logits.device)
    keep_t = keep_t.expand(len(logits)) if keep_t.dim() == 0 else keep_t.float()
    probs = F.softmax(logits.float(), dim=1)
    noisy = torch.bmm(probs.unsqueeze(1), _flip_matrix(keep_t, num_classes)).squeeze(1)
    picked = noisy.gather(1, noisy_labels.long().view(-1, 1)).squeeze(1)
    return -torch.log(picked.clamp_min(1e-12)).mean()


def debiased_accuracy(agreement: float, keep: float, num_classes: int) -> float:
    """The accuracy on true labels that an ``agreement`` with labels through
    randomized response (keep probability ``keep``) implies: a correct
    prediction agrees with probability ``keep``, a wrong one with ``(1 - keep) /
    (K - 1)``, so ``agreement = a * keep + (1 - a) * (1 - keep) / (K - 1)``,
    solved for ``a`` (unbiased; clipped to [0, 1])."""
    off = (1.0 - keep) / (num_classes - 1)
    if keep - off <= 0:
        raise ValueError("labels kept with probability 1/K or less carry no information")
    return min(1.0, max(0.0, (agreement - off) / (keep - off)))


def _centred_distances(x: Tensor) -> Tensor:
    flat = x.float().reshape(len(x), -1)
    d = torch.cdist(flat, flat)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """The sample distance correlation of the rows of ``x`` and ``z`` (any shapes
    with the same first dimension; 0 when either is constant or the batch has
    fewer than two rows): 0 for independent samples in the limit, 1 when one is
    a similarity transform of the other. Differentiable."""
    if len(x) != len(z):
        raise ValueError(f"{len(x)} inputs but {len(z)} feature rows")
    if len(x) < 2:
        return torch.zeros((), device=z.device)
    a, b = _centred_distances(x), _centred_distances(z)
    dcov = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    if float(dvar) <= 0:
        return torch.zeros((), device=z.device)
    return torch.sqrt(dcov.clamp_min(0.0) / torch.sqrt(dvar))
