"""What one hostile node of three can still do: wrong labels or misleading logits
for its own samples, which the server cannot tell from noisy data.

    python benchmarks/one_hostile.py [--rounds 3] [--seeds 42 43 44] [--dataset digits]

Runs the built-in ClientApp functions and the real strategy in one process (an
in-process Grid, one Context per node, the run config's defaults otherwise), three
nodes (partitions 0, 1, 2), and prints the server model's accuracy on the two
honest nodes' test features after the last round, mean ± sd over the seeds, for:

- ``honest``: all three nodes honest;
- ``labels``: node 2 uploads its training samples with wrong labels (``y + 1``
  mod the classes: label flipping, every sample);
- ``logits``: node 2 uploads misleading edge logits: for every sample, the largest
  logit on a wrong class (``y + 1``), as large as its honest largest logit, so
  within the other nodes' range;
- ``both``: the two together.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flwr_fedgkt import client_app
from flwr_fedgkt.node import partition_sample_ids
from flwr_fedgkt.records import FEATURES_KEY
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.strategy import FedGKT

CASES = ("honest", "labels", "logits", "both")
NODES = 3
HOSTILE_PARTITION = 2


class Grid:
    """Each Message straight to its node's handler, in node order."""

    def __init__(self, contexts: dict[int, Context], hostile: int, case: str) -> None:
        self.contexts, self.hostile, self.case = contexts, hostile, case

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        handlers = {
            MessageType.TRAIN: client_app.train,
            MessageType.EVALUATE: client_app.evaluate,
            MessageType.QUERY: client_app.query,
        }
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = handlers[msg.metadata.message_type](msg, self.contexts[node])
            if node == self.hostile and msg.metadata.message_type == MessageType.TRAIN:
                self.spoil(reply)
            replies.append(reply)
        return replies

    def spoil(self, reply: Message) -> None:
        arrays = reply.content.array_records[FEATURES_KEY]
        labels = arrays["labels"].numpy()
        classes = arrays["logits"].numpy().shape[1]
        wrong = (labels + 1) % classes
        if self.case in ("labels", "both"):
            arrays["labels"] = Array(wrong.astype(labels.dtype))
        if self.case in ("logits", "both"):
            logits = arrays["logits"].numpy().copy()
            top = logits.max(axis=1)
            logits[np.arange(len(wrong)), wrong] = top + np.abs(top) + 1.0
            arrays["logits"] = Array(logits.astype(np.float32))


def run(case: str, seed: int, rounds: int, dataset: str, workdir: Path) -> float:
    """The server's accuracy on the honest nodes' test features after ``rounds``."""
    values = {"dataset": dataset, "seed": seed, "device": "cpu"}
    config = RunConfig.from_mapping(values)
    strategy = FedGKT(
        ServerTrainer.from_run_config(config, num_classes=10),
        server_epochs=config.server_epochs,
        feature_dtype=config.feature_dtype,
        global_sample_ids=True,
        sample_ids=partition_sample_ids(config, NODES),
        min_available_nodes=NODES,
        seed=seed,
    )
    contexts = {
        10 + i: Context(
            run_id=1,
            node_id=10 + i,
            node_config={"partition-id": i, "num-partitions": NODES},
            state=RecordDict(),
            run_config={**values, "client-state-dir": str(workdir / f"{case}-{seed}")},
        )
        for i in range(NODES)
    }
    grid = Grid(contexts, 10 + HOSTILE_PARTITION, case)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds)
    last = strategy.history[-1]
    rejected = [r["reason"] for r in strategy.history for r in r["rejected_replies"]]
    if rejected:
        print(f"    ({case}, seed {seed}: rejected {rejected[:2]})")
    honest = [last["node_accuracy"][str(i)] for i in range(NODES) if i != HOSTILE_PARTITION]
    return float(np.mean(honest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(2)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(
        f"one_hostile: {NODES} nodes (partition {HOSTILE_PARTITION} hostile), "
        f"{args.rounds} rounds, {args.dataset}, seeds {args.seeds}"
    )
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="one_hostile-") as tmp:
        for case in args.cases:
            for seed in args.seeds:
                started = time.perf_counter()
                accuracy = run(case, seed, args.rounds, args.dataset, Path(tmp))
                results.setdefault(case, []).append(accuracy)
                print(
                    f"  {case} seed {seed}: {accuracy:.4f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    print("\nserver accuracy on the honest nodes' test features after the last round")
    base = statistics.fmean(results["honest"]) if "honest" in results else None
    for case, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        delta = "" if base is None else f" ({statistics.fmean(values) - base:+.4f})"
        print(f"  {case:<8} {statistics.fmean(values):.4f} ± {sd:.4f}{delta}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
