"""Start and stop real Flower processes for end-to-end tests.

The helpers live in :mod:`flwr_fedgkt.processes` (the comparison command uses them
too); this module keeps the names the tests import. Every process a test starts is
stopped by its process id (and its process group), including processes started by
those processes, which are found through a marker in their environment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr_fedgkt.processes import (
    MARKER,
    REPO,
    flwr_run,
    free_port,
    marked_pids,
    start_local_superlink,
    stop,
)
from flwr_fedgkt.processes import flower_environment as _flower_environment

__all__ = [
    "MARKER",
    "REPO",
    "free_port",
    "flower_environment",
    "flwr_run",
    "start_local_superlink",
    "stop",
]

_marked_pids = marked_pids


@contextmanager
def flower_environment(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME (under ``tmp_path``), free local-SuperLink ports and a
    process marker; on exit every process that carries the marker is stopped, by id."""
    with _flower_environment(tmp_path) as env:
        yield env
