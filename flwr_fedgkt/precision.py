"""Training precision: float32, bfloat16 autocast where the hardware runs it, or
float16 autocast with a gradient scaler (for GPUs).

``bfloat16`` and ``float16`` run the models' forward (and so backward) passes under
``torch.autocast`` with float32 master weights and optimizer state; losses, KD
softmaxes and metrics are computed from float32 logits. float16's narrow range
needs loss scaling: its trainers scale the loss with a
``torch.amp.GradScaler`` (:func:`loss_scaler`), which skips a step whose scaled
gradients overflow and lowers the scale. ``auto`` picks bfloat16 where the
hardware has native bfloat16 arithmetic (a CPU with AVX512-BF16 or AMX, a CUDA GPU
that supports it) and float32 elsewhere; each process decides for its own hardware
(the server for itself, every node for itself). ``auto`` never picks float16: it
is for GPUs without bfloat16 and is chosen by name (it runs on a CPU too, slowly
where the CPU has no float16 arithmetic).

This module imports no Flower code.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = [
    "PRECISIONS",
    "TRAINING_PRECISIONS",
    "cpu_has_native_bfloat16",
    "cpuinfo_has_bfloat16",
    "native_bfloat16",
    "resolve_precision",
    "autocast",
    "loss_scaler",
]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
"""The values of the ``precision`` run-config key."""

TRAINING_PRECISIONS = PRECISIONS[1:]
"""The precisions a process trains in (``auto`` resolved)."""

_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpuinfo_has_bfloat16(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a ``/proc/cpuinfo`` text names
    AVX512-BF16 or AMX-BF16."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return any(flag in line.split(":", 1)[1].split() for flag in _BF16_CPU_FLAGS)
    return False


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16), as
    its flags in ``/proc/cpuinfo`` say (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return cpuinfo_has_bfloat16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def native_bfloat16(
    device: torch.device, cpu_check: Callable[[], bool] = cpu_has_native_bfloat16
) -> bool:
    """Whether ``device`` runs bfloat16 natively (``cpu_check`` for a CPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_check()
    return False


def resolve_precision(
    precision: str,
    device: torch.device,
    cpu_check: Callable[[], bool] = cpu_has_native_bfloat16,
) -> str:
    """The precision to train in: ``auto`` is bfloat16 where ``device`` runs it
    natively, float32 elsewhere; the others are themselves. ValueError for an
    unknown name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device, cpu_check) else "float32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The forward passes of a block in ``precision`` (a resolved one): bfloat16 or
    float16 autocast, or nothing for float32."""
    if precision == "float32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision]):
        yield


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of a trainer in ``precision`` (a resolved one): enabled
    for float16 only; disabled, it passes losses and steps through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=precision == "float16")
