"""Start and stop real Flower processes for end-to-end tests.

The helpers live in ``tools/local_flower.py`` (the benchmarks and the comparison
command use them too; they are not part of the package); this module puts that
folder on ``sys.path`` and keeps the names the tests import. Every process a test
starts through them runs in its own process group and is stopped by id, with its
group, at the end, including the processes those processes started.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

from local_flower import (  # noqa: E402
    REPO,
    crash,
    flower_environment,
    flwr_run,
    free_port,
    processes_naming,
    ray_cluster,
    start_local_superlink,
    start_logged,
    stop,
    wait_healthy,
)

__all__ = [
    "REPO",
    "crash",
    "free_port",
    "flower_environment",
    "processes_naming",
    "ray_cluster",
    "flwr_run",
    "start_local_superlink",
    "start_logged",
    "stop",
    "wait_healthy",
]
