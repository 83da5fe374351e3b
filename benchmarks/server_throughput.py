"""Server training throughput inside a real ``aggregate_train`` versus a plain
PyTorch loop over the same tensors, same model, batch size and epochs.

    python benchmarks/server_throughput.py [--samples 1024] [--nodes 4] [--epochs 1]

Prints samples per second for both and their ratio (goal: at least 0.9).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_message  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flwr_fedgkt.codec import decode_features, encode_features  # noqa: E402
from flwr_fedgkt.distill import ce_kd_loss  # noqa: E402
from flwr_fedgkt.records import FEATURES_KEY, META_KEY, METRICS_KEY, arrays_record  # noqa: E402
from flwr_fedgkt.server import ServerTrainer  # noqa: E402
from flwr_fedgkt.strategy import FedGKT  # noqa: E402


def replies(
    samples: int, nodes: int, dtype: str
) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(samples, 16, 32, 32, generator=gen))
    logits = torch.randn(samples, 10, generator=gen)
    labels = torch.randint(0, 10, (samples,), generator=gen)
    messages = []
    for node, rows in enumerate(torch.arange(samples).chunk(nodes), start=1):
        arrays = encode_features(feats[rows], dtype).arrays()
        arrays.update(
            logits=logits[rows].numpy(),
            labels=labels[rows].numpy(),
            ids=rows.numpy().astype(np.int64),
        )
        content = RecordDict(
            {
                FEATURES_KEY: arrays_record(arrays),
                METRICS_KEY: MetricRecord({"num-examples": len(rows)}),
                META_KEY: ConfigRecord(
                    {"server-round": 1, "feature-dtype": dtype, "node-key": str(node)}
                ),
            }
        )
        messages.append(make_message(content, node, 0, MessageType.TRAIN))
    return messages, feats, logits, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp
    messages, feats, logits, labels = replies(args.samples, args.nodes, args.dtype)
    wire = encode_features(feats, args.dtype)
    feats = decode_features(wire)  # the plain loop sees the same (rounded) values

    # Plain PyTorch: one model, tensors already in memory, shuffled batches
    plain = ServerTrainer(10, batch_size=args.batch_size, seed=0, device="cpu")
    gen = torch.Generator().manual_seed(0)
    plain.model.train()
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(args.samples, generator=gen)
        for i in range(0, args.samples, args.batch_size):
            idx = order[i : i + args.batch_size]
            x = feats[idx].to(memory_format=torch.channels_last)
            loss = ce_kd_loss(plain.model(x), labels[idx], logits[idx]).loss
            plain.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            plain.optimizer.step()
    plain_seconds = time.perf_counter() - start

    # The strategy: decode and validate the replies, store them, train, server logits
    trainer = ServerTrainer(10, batch_size=args.batch_size, seed=0, device="cpu")
    strategy = FedGKT(
        trainer, server_epochs=args.epochs, feature_dtype=args.dtype, min_available_nodes=1
    )
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(range(1, args.nodes + 1)))
    start = time.perf_counter()
    strategy.aggregate_train(1, messages)
    hook_seconds = time.perf_counter() - start
    train_seconds = strategy.engine.current.server_train_seconds
    total = args.samples * args.epochs
    print(
        f"plain PyTorch loop:        {total / plain_seconds:8.1f} samples/s ({plain_seconds:.1f} s)"
    )
    print(
        f"training in the hook:      {total / train_seconds:8.1f} samples/s ({train_seconds:.1f} s)"
    )
    print(
        f"whole aggregate_train:     {total / hook_seconds:8.1f} samples/s ({hook_seconds:.1f} s,"
        " with validation, storing and server logits)"
    )
    print(
        f"ratio (training in the hook / plain): {plain_seconds / train_seconds:.2f} (goal >= 0.9)"
    )
    print(f"ratio (whole hook / plain):           {plain_seconds / hook_seconds:.2f}")


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
