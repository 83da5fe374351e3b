"""Server memory against stored feature bytes, for the memory and the disk store.

    python benchmarks/server_memory.py [--rounds 4] [--nodes-per-round 2] [--samples 800]

Each store runs in a fresh process (peak RSS only grows): a real FedGKT strategy
with a ResNet-55 server model gets, every round, uploads from new nodes
(float16 features, ``--samples`` per node), so the store grows round by round
while each round's traffic stays the same, as under partial participation. The
messages of a round are built just before its ``aggregate_train`` and dropped
after it, as Flower does.

Prints per round the stored feature bytes and the peak RSS above the RSS before
round 1, and:

* memory store: (peak RSS - RSS before round 1) / stored bytes (goal: at most 1.5),
  and the slope, extra peak RSS per extra stored byte between the first and the
  last round (the part that grows with the store);
* disk store: peak RSS growth from the first to the last round, against the
  store's growth (goal: flat).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


from flwr_fedgkt.recorder import peak_rss_bytes  # noqa: E402

MB = 2**20


def rss_bytes() -> int:
    """Current resident memory of this process (Linux: /proc; else the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def child(store_kind: str, rounds: int, per_round: int, samples: int, directory: str) -> None:
    from conftest import make_message
    from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flwr_fedgkt.codec import encode_features
    from flwr_fedgkt.records import FEATURES_KEY, META_KEY, METRICS_KEY, arrays_record
    from flwr_fedgkt.server import ServerTrainer
    from flwr_fedgkt.store import FeatureStore
    from flwr_fedgkt.strategy import FedGKT

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp
    torch.manual_seed(0)
    trainer = ServerTrainer(10, batch_size=64, seed=0, device="cpu")
    store = FeatureStore(Path(directory) / "store" if store_kind == "disk" else None)
    strategy = FedGKT(
        trainer,
        feature_dtype="float16",
        min_train_nodes=per_round,
        min_available_nodes=per_round,
        store=store,
    )
    gen = torch.Generator().manual_seed(0)

    def upload(node: int, server_round: int):
        ids = np.arange(node * samples, (node + 1) * samples, dtype=np.int64)
        feats = torch.relu(torch.randn(samples, 16, 32, 32, generator=gen))
        arrays = encode_features(feats, "float16").arrays()
        del feats
        arrays.update(
            logits=torch.randn(samples, 10, generator=gen).numpy(),
            labels=torch.randint(0, 10, (samples,), generator=gen).numpy(),
            ids=ids,
        )
        content = RecordDict(
            {
                FEATURES_KEY: arrays_record(arrays),
                METRICS_KEY: MetricRecord({"num-examples": samples}),
                META_KEY: ConfigRecord(
                    {
                        "server-round": server_round,
                        "feature-dtype": "float16",
                        "node-key": str(node),
                    }
                ),
            }
        )
        return make_message(content, node, 0, MessageType.TRAIN)

    gc.collect()
    before = rss_bytes()
    for server_round in range(1, rounds + 1):
        nodes = list(range((server_round - 1) * per_round, server_round * per_round))
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), NodeList(nodes))
        messages = [upload(node, server_round) for node in nodes]
        start = time.perf_counter()
        strategy.aggregate_train(server_round, messages)
        seconds = time.perf_counter() - start
        del messages
        gc.collect()
        print(
            json.dumps(
                {
                    "round": server_round,
                    "stored_bytes": store.nbytes,
                    "stored_samples": store.num_samples,
                    "rss_before": before,
                    "peak_rss": peak_rss_bytes(),
                    "rss": rss_bytes(),
                    "seconds": seconds,
                }
            ),
            flush=True,
        )


def run_child(store_kind: str, args: argparse.Namespace, directory: str) -> list[dict]:
    command = [
        sys.executable,
        __file__,
        "--child",
        store_kind,
        "--rounds",
        str(args.rounds),
        "--nodes-per-round",
        str(args.nodes_per_round),
        "--samples",
        str(args.samples),
        "--directory",
        directory,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes-per-round", type=int, default=2)
    parser.add_argument("--samples", type=int, default=800, help="training samples per node")
    parser.add_argument("--child", choices=("memory", "disk"), help=argparse.SUPPRESS)
    parser.add_argument("--directory", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds, args.nodes_per_round, args.samples, args.directory)
        return

    import tempfile

    print(
        f"ResNet-55 server, batch 64, float16 features, {args.nodes_per_round} new nodes x "
        f"{args.samples} samples per round, {args.rounds} rounds"
    )
    for kind in ("memory", "disk"):
        with tempfile.TemporaryDirectory(prefix="fedgkt-memory-") as directory:
            rows = run_child(kind, args, directory)
        print(f"\n{kind} store")
        print("round | stored MiB | peak RSS - RSS before round 1 (MiB) | RSS now (MiB) | s")
        for r in rows:
            print(
                f"{r['round']:5d} | {r['stored_bytes'] / MB:10.1f} | "
                f"{(r['peak_rss'] - r['rss_before']) / MB:35.1f} | {r['rss'] / MB:13.1f} | "
                f"{r['seconds']:.0f}"
            )
        first, last = rows[0], rows[-1]
        growth = (last["peak_rss"] - first["peak_rss"]) / MB
        stored_growth = (last["stored_bytes"] - first["stored_bytes"]) / MB
        if kind == "memory":
            ratio = (last["peak_rss"] - last["rss_before"]) / last["stored_bytes"]
            slope = growth / stored_growth if stored_growth else float("nan")
            print(
                f"(peak RSS - RSS before round 1) / stored bytes: {ratio:.2f} (goal <= 1.5); "
                f"slope {slope:.2f} MiB of peak RSS per stored MiB, rounds 1-{last['round']}"
            )
        else:
            print(
                f"peak RSS grew {growth:.1f} MiB while the store grew {stored_growth:.1f} MiB "
                f"(goal: flat); fixed cost above RSS before round 1: "
                f"{(last['peak_rss'] - last['rss_before']) / MB:.1f} MiB"
            )


class NodeList:
    """What the strategy's sampling uses of a Grid; the nodes do not answer the
    key query (they are sampled by node id)."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages, timeout=None) -> list:
        return []


if __name__ == "__main__":
    main()
