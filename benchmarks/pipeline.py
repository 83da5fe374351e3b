"""Pipelined rounds against sequential ones, with the server and the edge on their
own CPU core.

    python benchmarks/pipeline.py [--rounds 6] [--seed 42 43 44] [--client-epochs 4]
                                  [--server-epochs 2]

A deployment on 127.0.0.1 (its own FLWR_HOME and free ports; every process
stopped by id at the end): a SuperLink pinned to core 1 (``taskset -c 1``; the
ServerApp process it starts inherits the pin) and one SuperNode pinned to core 0
(its ClientApp processes inherit it), every process with one torch / OpenMP
thread. On it, ``flwr run .`` with ``pipeline=false`` and then ``pipeline=true``,
the same seed, data (``digits``, the one node holds it all) and rounds; 4 edge
and 2 server epochs per round, so that on one core each the server's training
and the node's part of a round (training, extraction, the transport's polling)
take about as long. Prints,
per run: accuracy by round, the edge's and the server's time per round, and the
steady round time: the mean time between the ends of rounds 2 to R-1 (round 1
holds the start-up; a pipelined run's last round ends without a next round to
overlap). Then pipelined / sequential steady round time, and final accuracy over
the seeds.

(In simulation the ServerApp and the Ray workers are children of one process
tree on one machine, so they cannot be pinned apart; a deployment can.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from flwr.common.config import parse_config_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from local_flower import (  # noqa: E402
    REPO,
    flower_environment,
    free_port,
    start_logged,
    stop,
    wait_healthy,
)


def run_pair(workdir: Path, base: str, rounds: int) -> dict[str, dict]:
    """One SuperLink (core 1) and one SuperNode (core 0); a sequential and a
    pipelined ``flwr run`` on them; each run's results.json."""
    results = {}
    with flower_environment(workdir) as env:
        env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        started: list[subprocess.Popen] = []
        try:
            port = free_port()
            home = Path(env["FLWR_HOME"])
            home.mkdir(parents=True, exist_ok=True)
            (home / "config.toml").write_text(
                '[superlink]\ndefault = "pinned"\n\n'
                f'[superlink.pinned]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
            )
            link_log = workdir / "superlink.log"
            link = start_logged(
                ["taskset", "-c", "1", "flower-superlink", "--insecure", "--host", "127.0.0.1"]
                + ["--port", str(port), "--database", str(workdir / "state.db")]
                + ["--disable-runtime-dependency-installation"],
                env,
                link_log,
            )
            started.append(link)
            wait_healthy(port, link, link_log)
            started.append(
                start_logged(
                    ["taskset", "-c", "0", "flower-supernode", "--insecure", "--superlink"]
                    + [f"127.0.0.1:{port}", "--port", str(free_port()), "--node-config"]
                    + ["partition-id=0 num-partitions=1"],
                    env,
                    workdir / "supernode.log",
                )
            )
            for pipeline in ("false", "true"):
                out = workdir / f"pipeline-{pipeline}"
                config = f"{base} pipeline={pipeline} output-dir='{out}'"
                with open(workdir / f"{pipeline}.log", "w") as log:
                    done = subprocess.run(
                        ["flwr", "run", str(REPO), "pinned", "--stream", "--run-config", config],
                        env=env,
                        cwd=REPO,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        timeout=3600,
                    )
                path = out / "results.json"
                if done.returncode != 0 or not path.exists():
                    text = (workdir / f"{pipeline}.log").read_text()
                    raise SystemExit(f"flwr run failed:\n{text[-3000:]}")
                results[pipeline] = json.loads(path.read_text())
                if len(results[pipeline]["rounds"]) != rounds:
                    raise SystemExit(f"pipeline={pipeline}: {results[pipeline]['status']}")
        finally:
            stop([p.pid for p in started])
    return results


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def steady(rounds: list[dict]) -> float:
    """Mean time between the ends of rounds 2 to R-1."""
    ends = [r["ended_seconds"] for r in rounds]
    return (ends[-2] - ends[0]) / (len(ends) - 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, nargs="+", default=[42])
    parser.add_argument("--client-epochs", type=int, default=4)
    parser.add_argument("--server-epochs", type=int, default=2)
    parser.add_argument("--run-config", default="", help="extra run-config")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    ratios, finals = [], {"false": [], "true": []}
    for seed in args.seed:
        values: dict[str, object] = {
            "num-server-rounds": args.rounds,
            "dataset": "digits",
            "seed": seed,
            "client-epochs": args.client_epochs,
            "server-epochs": args.server_epochs,
            "min-train-nodes": 1,
            "min-evaluate-nodes": 1,
            "min-available-nodes": 1,
        }
        if args.run_config:  # overrides, not duplicates (a key may appear once)
            values.update(parse_config_args([args.run_config]))
        base = " ".join(f"{key}={_toml(value)}" for key, value in values.items())
        with tempfile.TemporaryDirectory(prefix="fedgkt-pipeline-") as scratch:
            results = run_pair(Path(scratch), base, args.rounds)
        print(f"\nseed {seed}: {base}")
        sequential = results["false"]["rounds"][1:]
        edge = statistics.mean(r["seconds"] - r["server_train_seconds"] for r in sequential)
        server = statistics.mean(r["server_train_seconds"] for r in sequential)
        print(
            f"sequential rounds 2-{args.rounds}: server training {server:.1f} s, the rest "
            f"(edge training, extraction, evaluation, transport) {edge:.1f} s per round"
        )
        print("pipeline | accuracy by round (%) | server train s / round | steady round s")
        times = {}
        for mode, res in results.items():
            rounds = res["rounds"]
            accuracy = " ".join(f"{100 * r['accuracy']:.1f}" for r in rounds)
            train = statistics.mean(r["server_train_seconds"] for r in rounds[1:])
            times[mode] = steady(rounds)
            finals[mode].append(100 * rounds[-1]["accuracy"])
            print(f"{mode:8s} | {accuracy} | {train:22.1f} | {times[mode]:14.1f}")
        ratios.append(times["true"] / times["false"])
        print(f"pipelined / sequential steady round: {ratios[-1]:.2f} (goal <= 0.6)")
    print(f"\n{len(args.seed)} seed(s): steady round ratio {statistics.mean(ratios):.2f}")
    for mode, values in finals.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"pipeline={mode}: final accuracy {statistics.mean(values):.2f} % "
            f"(sd {spread:.2f}) over seeds {args.seed}"
        )


if __name__ == "__main__":
    main()
