"""Files written whole or not at all.

This module imports no Flower code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomic"]


def write_atomic(path: Path, write: Callable[[BinaryIO], object], fsync: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary file beside it,
    then rename it into place: a reader (or a restart after a crash) sees the old
    file or the new one, never half of one. With ``fsync`` the data reaches the
    disk before the rename (a power loss keeps it too). The folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
