"""Parameters and FLOPs of the models, measured rather than derived by hand.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` on one real
forward (and backward) pass; a multiply-add counts as two FLOPs.

This module imports no Flower code.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import FEATURE_CHANNELS, build_model, count_parameters

__all__ = ["input_shape", "count_flops", "model_profile"]

_SERVER_MODELS = ("resnet55", "resnet109")


def input_shape(name: str) -> tuple[int, int, int]:
    """Per-sample input shape: features for server models, images otherwise."""
    return (FEATURE_CHANNELS, 32, 32) if name in _SERVER_MODELS else (3, 32, 32)


def count_flops(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> tuple[float, float]:
    """``(forward, forward + backward)`` FLOPs per sample of ``model`` on ``shape``."""
    model = model.train()
    x = torch.randn(batch, *shape)
    with FlopCounterMode(display=False) as forward_counter:
        out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    with FlopCounterMode(display=False) as backward_counter:
        logits.sum().backward()
    model.zero_grad(set_to_none=True)
    forward = forward_counter.get_total_flops() / batch
    backward = backward_counter.get_total_flops() / batch
    return forward, forward + backward


@lru_cache(maxsize=16)
def _profile(name: str, num_classes: int) -> tuple[int, float, float]:
    model = build_model(name, num_classes)
    forward, train = count_flops(model, input_shape(name))
    return count_parameters(model), forward, train


def model_profile(name: str, num_classes: int = 10) -> dict[str, Any]:
    """Name, parameters and FLOPs per sample (inference and training) of a model."""
    params, forward, train = _profile(name, num_classes)
    return {
        "name": name,
        "params": params,
        "forward_flops_per_sample": forward,
        "train_flops_per_sample": train,
    }
