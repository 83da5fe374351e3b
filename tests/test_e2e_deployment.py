"""End to end on Flower's deployment engine: a real SuperLink and two SuperNodes
on free loopback ports, driven by ``flwr run``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flower_processes import (
    REPO,
    flower_environment,
    free_port,
    start_logged,
    stop,
    wait_healthy,
)

pytestmark = pytest.mark.e2e


def test_pipelined_rounds_on_superlink_and_two_supernodes(tmp_path) -> None:
    # Prepare
    out = tmp_path / "out"
    started: list[subprocess.Popen] = []
    with flower_environment(tmp_path) as env:
        try:
            port = free_port()
            home = Path(env["FLWR_HOME"])
            home.mkdir(parents=True)
            (home / "config.toml").write_text(
                '[superlink]\ndefault = "deployment"\n\n'
                f'[superlink.deployment]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
            )
            link_log = tmp_path / "superlink.log"
            link = start_logged(
                [
                    "flower-superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--database",
                    str(tmp_path / "state.db"),
                    "--disable-runtime-dependency-installation",
                ],
                env,
                link_log,
            )
            started.append(link)
            wait_healthy(port, link, link_log)
            for i in range(2):
                started.append(
                    start_logged(
                        [
                            "flower-supernode",
                            "--insecure",
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--port",
                            str(free_port()),
                            "--node-config",
                            f"partition-id={i} num-partitions=2",
                        ],
                        env,
                        tmp_path / f"supernode{i}.log",
                    )
                )
            run_config = (
                "num-server-rounds=2 dataset='synthetic' synthetic-samples-per-node=40 "
                "server-epochs=1 batch-size=16 feature-dtype='float16' pipeline=true "
                f"seed=2 output-dir='{out}'"
            )
            # Execute
            result = subprocess.run(
                ["flwr", "run", str(REPO), "deployment", "--stream", "--run-config", run_config],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
        finally:
            stop([p.pid for p in started])
    # Assert
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert all(p.poll() is not None for p in started)
    assert (out / "results.json").is_file(), result.stdout[-4000:] + result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["train_nodes"] == 2 and r["eval_nodes"] == 2 for r in rounds)
    assert all(r["bytes_up"] > 0 and r["rejected_replies"] == [] for r in rounds)
    assert all(r["accuracy"] is not None for r in rounds)
    # pipelined: nodes distil from server logits one round older (none in round 2;
    # that the next round gets them: the simulation's pipelined tests)
    assert rounds[1]["bytes_down"] == 0
