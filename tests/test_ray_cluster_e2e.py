"""Flower's simulation engine on a Ray cluster that was started on its own
(``ray start --head``): the simulation attaches to it through ``RAY_ADDRESS`` and
its ClientApps run on the cluster's workers.

The cluster is the session's (``shared_ray_cluster`` in conftest.py): every
simulation of the test session attaches to it, and it is stopped by process id at
the end (not with ``ray stop``, which would stop every Ray user's cluster on the
machine); the fixture fails the session if any of its processes is left.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_simulation_runs_on_a_ray_cluster_started_beforehand(
    shared_ray_cluster, message_api_run
) -> None:
    # Prepare / Execute: the session's Message-API run (conftest), on the cluster
    results, _ = message_api_run
    # Assert: the run completed, a driver attached to the cluster and the
    # ClientApps ran on the cluster's workers
    assert results["status"] == "completed"
    assert all(record["train_nodes"] == 2 for record in results["rounds"])
    logs = shared_ray_cluster.temp_dir / "session_latest" / "logs"
    assert list(logs.glob("python-core-driver-*.log")), "no driver attached"
    assert any(
        "ClientAppActor" in path.read_text(errors="replace") for path in logs.glob("worker-*")
    ), "no ClientApp ran on the cluster's workers"
