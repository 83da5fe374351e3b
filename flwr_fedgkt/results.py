"""``results.json``: the run's config, model sizes and one record per round.

Written atomically (temporary file, then rename) after every round, so a crash
keeps every finished round and never leaves a half-written file.

This module imports no Flower code.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ResultsWriter", "write_json_atomic"]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_clean(data), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultsWriter:
    """Collects round records and rewrites ``<output_dir>/results.json`` each round.

    ``status`` says how far the run got: ``running`` until :meth:`finish` records
    ``completed`` or ``failed`` (with the ``error``).
    """

    def __init__(self, output_dir: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(output_dir) / "results.json"
        self.header = dict(header)
        self.rounds: list[dict[str, Any]] = []
        self.status = "running"
        self.error: str | None = None
        self.write()

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds.append(dict(record))
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        """Record how the run ended (``completed``, ``failed``, ...) and write."""
        self.status, self.error = status, error
        self.write()

    def write(self) -> None:
        ending = {"status": self.status}
        if self.error is not None:
            ending["error"] = self.error
        write_json_atomic(self.path, {**self.header, **ending, "rounds": self.rounds})
