"""Server checkpoints: written atomically after every round, read back to resume.

A checkpoint holds the server model, its optimizer and scheduler, the round number,
every node's latest server logits and the RNG states that drive the server's
sampling and shuffling. It is written to a temporary file, flushed to disk and then
renamed, so a kill during a save never leaves a half-written checkpoint under the
final name; the two newest checkpoints are kept, and a checkpoint that cannot be
read (truncated or corrupt) is skipped in favour of the previous one.

This module imports no Flower code.
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import write_atomic

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_latest_checkpoint",
    "rng_state",
    "set_rng_state",
]

_NAME = re.compile(r"^checkpoint-round-(\d+)\.pt$")
KEEP = 2
FORMAT_VERSION = 2  # 2: trainer state by its own state_dict, per node key


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(directory: str | Path, server_round: int, state: dict[str, Any]) -> Path:
    """Write ``state`` for ``server_round`` atomically; keep the newest two."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, "round": server_round, **state}, buffer)
    final = directory / f"checkpoint-round-{server_round}.pt"
    write_atomic(final, lambda handle: handle.write(buffer.getvalue()), fsync=True)
    for old in _checkpoints(directory)[KEEP:]:
        old.unlink(missing_ok=True)
    return final


def _checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest round first."""
    found = []
    for path in directory.glob("checkpoint-round-*.pt"):
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def load_latest_checkpoint(directory: str | Path) -> tuple[dict[str, Any], Path, list[str]]:
    """The newest readable checkpoint in ``directory``.

    Returns the state, its path, and a note for each newer file that was skipped
    because it could not be read. Raises :class:`CheckpointError` when none is
    usable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"resume-from: {directory} is not a directory")
    skipped: list[str] = []
    for path in _checkpoints(directory):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
                raise ValueError("not a checkpoint of this format")
            return state, path, skipped
        except Exception as err:  # truncated or corrupt: fall back to an older one
            skipped.append(f"{path.name}: {type(err).__name__}: {err}")
    detail = "; ".join(skipped) if skipped else "no checkpoint-round-*.pt files"
    raise CheckpointError(f"no usable checkpoint in {directory} ({detail})")
