"""Scale: many simulated nodes, a few sampled per round, on Flower's simulation
engine.

    python benchmarks/scale.py [--nodes 100] [--sampled 10] [--rounds 3]

Runs ``flwr run .`` with ``--nodes`` SuperNodes on a local simulation SuperLink
(private FLWR_HOME, free ports, every process stopped by id at the end), the
small ``synthetic`` data set split over all nodes, ``--sampled`` nodes sampled for
training and for evaluation per round. Prints the wall time, each round's
seconds, sampled/stored nodes, and the server's peak RSS (from ``results.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from local_flower import simulate  # noqa: E402

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config")
    args = parser.parse_args()
    fraction = args.sampled / args.nodes
    run_config = (
        f"num-server-rounds={args.rounds} dataset='synthetic' "
        f"fraction-train={fraction} fraction-evaluate={fraction} "
        f"min-train-nodes={args.sampled} min-evaluate-nodes={args.sampled} "
        f"min-available-nodes={args.nodes} {args.run_config}"
    ).strip()
    try:
        rounds, wall = simulate(run_config, args.nodes)
    except (RuntimeError, TimeoutError) as err:
        raise SystemExit(str(err)) from None
    print(
        f"{args.nodes} simulated nodes, {args.sampled} sampled per round, run-config: {run_config}"
    )
    print("round | seconds | train nodes | stored nodes | stored samples | failed | accuracy")
    for r in rounds:
        print(
            f"{r['round']:5d} | {r['seconds']:7.1f} | {r['train_nodes']:11d} | "
            f"{r['stored_nodes']:12d} | {r['stored_samples']:14d} | "
            f"{len(r['failed_nodes']):6d} | {r['accuracy']:.4f}"
        )
    peak = max(r["server_peak_rss_bytes"] for r in rounds)
    print(f"completed: {len(rounds)} rounds; wall time of flwr run {wall:.1f} s")
    print(f"server peak RSS {peak / MB:.0f} MiB")


if __name__ == "__main__":
    main()
