"""Flower's simulation engine on a Ray cluster that was started on its own
(``ray start --head``): the simulation attaches to it through ``RAY_ADDRESS`` and
its ClientApps run on the cluster's workers. The cluster is stopped by process id
(its process group), not with ``ray stop``, which would stop every Ray user's
cluster on the machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from flower_processes import (
    REPO,
    flower_environment,
    flwr_run,
    free_port,
    start_local_superlink,
    stop,
)

pytestmark = pytest.mark.e2e


def _ours(temp_dir: Path) -> list[int]:
    """Ids of the processes whose command line names the cluster's temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_simulation_runs_on_a_ray_cluster_started_beforehand(tmp_path) -> None:
    # Prepare: a one-node Ray cluster on loopback (a short temp dir: Ray's socket
    # paths must stay below 108 characters)
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port = free_port()
    log = tmp_path / "ray.log"
    with open(log, "wb") as handle:
        cluster = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
            + [f"--port={port}", f"--ray-client-server-port={free_port()}", "--num-cpus=2"]
            + ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    out = tmp_path / "out"
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert cluster.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # Execute: a local SuperLink whose simulation attaches to the cluster
        with flower_environment(tmp_path / "flower") as env:
            env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
            start_local_superlink(env, tmp_path / "superlink.log")
            result = flwr_run(
                env,
                REPO,
                "num-server-rounds=1 dataset='synthetic' synthetic-samples-per-node=30 "
                f"batch-size=16 output-dir='{out}'",
                num_supernodes=2,
                timeout=600,
            )
        # Assert: the run completed, and its ClientApps ran on the cluster's workers
        assert result.returncode == 0, result.stdout[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["status"] == "completed"
        (record,) = results["rounds"]
        assert record["train_nodes"] == 2 and record["accuracy"] is not None
        logs = temp_dir / "session_latest" / "logs"
        assert list(logs.glob("python-core-driver-*.log")), "no driver attached"
        assert any(
            "ClientAppActor" in path.read_text(errors="replace") for path in logs.glob("worker-*")
        ), "no ClientApp ran on the cluster's workers"
    finally:
        stop([cluster])
        stop(_ours(temp_dir))
        left = _ours(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert left == [], f"cluster processes still running: {left}"
