"""Scale: a large simulated federation, a few nodes sampled per round.

    python benchmarks/scale.py [--nodes 1000] [--sampled 20] [--rounds 5]
                               [--samples-per-node 30] [--store both]

Runs ``flwr run .`` on Flower's simulation engine with ``--nodes`` SuperNodes
(its own local SuperLink, private FLWR_HOME, free ports, every process stopped by
id at the end): the ``synthetic`` data set with ``--samples-per-node`` samples
per node (``synthetic-samples-per-node``), ``--sampled`` nodes sampled for
training and for evaluation per round, once with each feature store asked for
(``memory``, ``disk`` or ``both``). Prints each round (seconds, nodes, stored
nodes and samples, failures, accuracy) and a summary line per store: round 1
(which also asks every node for its key), the mean of the later rounds and of
their server training (which grows with the stored samples), the server's peak
RSS and the bytes of the run's output folder (the disk store lives there). Run
it at two federation sizes with the same ``--sampled`` to see what a larger
federation costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from local_flower import SimulatedRun, simulate_run  # noqa: E402

MB = 2**20


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def report(run: SimulatedRun, nodes: int, store: str) -> str:
    """Print the run's rounds; return its summary line."""
    results = run.results
    rounds = results["rounds"]
    print(f"\n{nodes} nodes, feature store {store}: status {results['status']}")
    if results.get("error"):
        print(f"  error: {results['error']}")
    print("round | seconds | train nodes | stored nodes | stored samples | failed | accuracy")
    for r in rounds:
        print(
            f"{r['round']:5d} | {r['seconds']:7.1f} | {r['train_nodes']:11d} | "
            f"{r['stored_nodes']:12d} | {r['stored_samples']:14d} | "
            f"{len(r['failed_nodes']):6d} | {_accuracy(r['accuracy'])}"
        )
    if not rounds:
        return f"{nodes:6d} | {store:6s} | no round completed ({results['status']})"
    later = [r["seconds"] for r in rounds[1:]]
    mean_later = f"{statistics.mean(later):6.1f}" if later else "     -"
    server = [r["server_train_seconds"] for r in rounds[1:]]
    mean_server = f"{statistics.mean(server):6.1f}" if server else "     -"
    peak = max(r["server_peak_rss_bytes"] for r in rounds)
    last = rounds[-1]
    failed = sum(len(r["failed_nodes"]) for r in rounds)
    return (
        f"{nodes:6d} | {store:6s} | {rounds[0]['seconds']:7.1f} | {mean_later} | {mean_server} | "
        f"{peak / MB:8.0f} | {last['stored_nodes']:6d} | {last['stored_samples']:7d} | "
        f"{run.output_bytes / MB:7.1f} | {failed:6d} | {_accuracy(last['accuracy'])} | "
        f"{run.wall:6.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-per-node", type=int, default=30)
    parser.add_argument("--store", choices=("memory", "disk", "both"), default="both")
    parser.add_argument("--run-config", default="", help="extra run-config")
    args = parser.parse_args()
    if not 0 < args.sampled <= args.nodes:
        parser.error("--sampled must lie in 1..--nodes")
    fraction = args.sampled / args.nodes
    base = (
        f"num-server-rounds={args.rounds} dataset='synthetic' "
        f"synthetic-samples-per-node={args.samples_per_node} "
        f"fraction-train={fraction} fraction-evaluate={fraction} "
        f"min-train-nodes={args.sampled} min-evaluate-nodes={args.sampled} "
        f"min-available-nodes={args.nodes}"
    )
    stores = ("memory", "disk") if args.store == "both" else (args.store,)
    summaries = []
    for store in stores:
        run_config = f"{base} feature-store='{store}' {args.run_config}".strip()
        print(f"flwr run with {args.nodes} SuperNodes, run-config: {run_config}", flush=True)
        try:
            run = simulate_run(run_config, args.nodes)
        except (RuntimeError, TimeoutError) as err:
            raise SystemExit(str(err)) from None
        summaries.append(report(run, args.nodes, store))
    print(
        f"\n{args.sampled} of {args.nodes} nodes sampled per round, "
        f"{args.samples_per_node} samples per node, {args.rounds} rounds"
    )
    print(
        " nodes | store  | round 1 | later  | server | peak RSS | stored | stored  | output  "
        "| failed | accuracy | flwr run"
    )
    print(
        "       |        |       s | mean s | train s|      MiB |  nodes | samples |     MiB "
        "|        |          |        s"
    )
    for line in summaries:
        print(line)


if __name__ == "__main__":
    main()
