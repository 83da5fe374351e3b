"""Bytes per training sample and final accuracy for each ``feature-dtype``.

    python benchmarks/feature_dtypes.py [--rounds 8] [--nodes 3] [--dataset digits]
                                        [--dtypes float32 float16 ...] [--seed 42]

Runs the same seeded FedGKT rounds (in one process, the core without Flower) once
per wire dtype and prints, side by side, the bytes one sample's features take on
the wire (counted from the encoded arrays) and the final server-model accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from flwr_fedgkt.codec import FEATURE_DTYPES, encode_features
from flwr_fedgkt.local import run_local
from flwr_fedgkt.models import FEATURE_CHANNELS
from flwr_fedgkt.settings import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=RunConfig().num_server_rounds)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--dtypes", nargs="*", default=list(FEATURE_DTYPES))
    parser.add_argument("--seed", type=int, default=RunConfig().seed)
    args = parser.parse_args()
    print(f"seed {args.seed}, {args.rounds} rounds, {args.nodes} nodes, {args.dataset}")
    sample = torch.relu(torch.randn(256, FEATURE_CHANNELS, 32, 32))
    header = ("dtype", "bytes/sample", "vs float32", "final acc", "best acc", "seconds")
    print("{:<10} {:>12} {:>10} {:>9} {:>8} {:>8}".format(*header))
    base = None
    for dtype in args.dtypes:
        per_sample = encode_features(sample, dtype).nbytes / len(sample)
        base = base or encode_features(sample, "float32").nbytes / len(sample)
        config = dataclasses.replace(
            RunConfig(),
            num_server_rounds=args.rounds,
            dataset=args.dataset,
            feature_dtype=dtype,
            seed=args.seed,
        )
        start = time.perf_counter()
        history = run_local(config, args.nodes)
        seconds = time.perf_counter() - start
        final, best = history[-1]["accuracy"], max(r["accuracy"] for r in history)
        ratio = base / per_sample
        print(
            f"{dtype:<10} {per_sample:12.0f} {ratio:9.2f}x {final:9.4f} {best:8.4f} {seconds:8.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
