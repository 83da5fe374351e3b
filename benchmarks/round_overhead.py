"""Wall time of a FedGKT round on Flower's simulation engine versus the same
computation in one process without Flower, in one run, same configuration.

    python benchmarks/round_overhead.py [--nodes 3] [--rounds 3] [--run-config "..."]

Flower side: ``flwr run .`` on a local simulation SuperLink that this script starts
(private FLWR_HOME, free ports; every process stopped by id when it ends); a
round's seconds are the strategy's own (from ``configure_train`` to the end of the
round's evaluation, as in ``results.json``), and the whole ``flwr run`` is timed
too. Plain side: :func:`flwr_fedgkt.local.run_local`, the same edge training,
codec, validation, server training and scoring, one process, no transport.

Prints both per round and the ratio Flower / plain (goal: at most 1.3). Round 1
carries the start-up of Flower's processes and is shown apart from the steady
rounds (2 and later) the ratio is taken over. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from flwr_fedgkt.local import run_local
from flwr_fedgkt.settings import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from local_flower import simulate  # noqa: E402


def parse_run_config(text: str) -> dict[str, object]:
    """``key=value`` pairs as ``--run-config`` takes them (TOML scalars)."""
    import tomllib

    values: dict[str, object] = {}
    for pair in shlex.split(text, posix=False):
        key, _, raw = pair.partition("=")
        values[key] = tomllib.loads(f"v = {raw}")["v"]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--run-config",
        default="",
        help="extra run-config for both sides, e.g. \"dataset='synthetic' server-epochs=2\"",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes start-up)")
    shared = (
        f"num-server-rounds={args.rounds} min-train-nodes={args.nodes} "
        f"min-evaluate-nodes={args.nodes} min-available-nodes={args.nodes} {args.run_config}"
    ).strip()

    try:
        flower_rounds, flower_total = simulate(shared, args.nodes)
    except (RuntimeError, TimeoutError) as err:
        raise SystemExit(str(err)) from None

    config = RunConfig.from_mapping(parse_run_config(shared))
    start = time.perf_counter()
    plain_rounds = run_local(config, args.nodes)
    plain_total = time.perf_counter() - start

    print(f"{args.nodes} nodes, {args.rounds} rounds, run-config: {shared}")
    print("round | Flower (s) | plain (s) | ratio | accuracy Flower / plain")
    for f, p in zip(flower_rounds, plain_rounds, strict=True):
        print(
            f"{f['round']:5d} | {f['seconds']:10.1f} | {p['seconds']:9.1f} | "
            f"{f['seconds'] / p['seconds']:5.2f} | {f['accuracy']:.4f} / {p['accuracy']:.4f}"
        )
    steady_f = statistics.mean(r["seconds"] for r in flower_rounds[1:])
    steady_p = statistics.mean(r["seconds"] for r in plain_rounds[1:])
    print(
        f"steady round (rounds 2-{args.rounds}): Flower {steady_f:.1f} s, plain {steady_p:.1f} s, "
        f"ratio {steady_f / steady_p:.2f} (goal <= 1.3)"
    )
    print(
        f"whole run: flwr run {flower_total:.1f} s (with process start-up and data loading), "
        f"plain {plain_total:.1f} s, ratio {flower_total / plain_total:.2f}"
    )


if __name__ == "__main__":
    main()
