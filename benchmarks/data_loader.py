"""Training loader throughput beside edge training throughput, on the same batches.

Writes a CIFAR-10-format copy (random pixels, torchvision's pickle layout) to a
temporary folder, loads one node's partition from it the way a run with
``data-dir`` does, then measures, in one process:

* the loader: shuffled batches of the training split with the training
  augmentation (random crop with padding 4, horizontal flip), in images/s;
* the edge model (ResNet-8): training steps (forward, CE + KD loss, backward,
  Adam step) on those very batches, already in memory, in images/s.

The loader must not be what limits training: it should be at least three times
faster. Run: ``python benchmarks/data_loader.py [--images 10000] [--batch-size 32]
[--threads N]`` (on a machine shared with other jobs, ``--threads 1`` avoids waiting
on a starved intra-op thread pool).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flwr_fedgkt.data import load_partition
from flwr_fedgkt.distill import ce_kd_loss
from flwr_fedgkt.edge import EdgeTrainer, LogitTable
from flwr_fedgkt.edge_data import training_batches

REQUIRED_RATIO = 3.0


def write_cifar10_copy(root: Path, num_train: int, num_test: int, seed: int = 0) -> None:
    """Random images in ``root/cifar-10-batches-py`` (five training batches, the test
    batch and ``batches.meta``), and torchvision told to expect this copy's MD5
    checksums: it checks a copy against the published archive's, which random
    pixels cannot match (the check itself stays on)."""
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_batch = num_train // 5
    files = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", num_test)]
    for name, n in files:
        rows = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "labels": labels}, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, handle, protocol=2)
    sums = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    CIFAR10.train_list = [[name, sums[name]] for name, _ in CIFAR10.train_list]
    CIFAR10.test_list = [[name, sums[name]] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = {**CIFAR10.meta, "md5": sums[CIFAR10.meta["filename"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images in the copy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="loader epochs to time")
    parser.add_argument("--train-batches", type=int, default=60, help="training steps to time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10_copy(Path(tmp), args.images, args.images // 5)
        start = time.perf_counter()
        part = load_partition("cifar10", 0, 1, "iid", seed=0, data_dir=tmp)
        load_seconds = time.perf_counter() - start
    data = part.train
    print(f"torch threads: {torch.get_num_threads()} | batch size {args.batch_size}")
    print(
        f"partition load (pickles -> normalised tensors): {len(data)} images, {load_seconds:.2f}s"
    )

    # the loader, with augmentation, as EdgeTrainer.train draws it
    generator = torch.Generator().manual_seed(0)
    for _ in training_batches(data, args.batch_size, generator):  # warm-up
        break
    seen, start = 0, time.perf_counter()
    batches = []
    for _ in range(args.epochs):
        for images, labels, ids in training_batches(data, args.batch_size, generator):
            seen += len(ids)
            if len(batches) < args.train_batches:
                batches.append((images, labels, ids))
    loader_rate = seen / (time.perf_counter() - start)

    # edge training steps on the same batches (already in memory)
    trainer = EdgeTrainer(part.num_classes, device="cpu", seed=0)
    teacher = LogitTable(data.ids, torch.randn(len(data), part.num_classes))
    trainer.model.train()

    def step(images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        logits, _ = trainer.model(images)
        targets, _ = teacher.lookup(ids)
        loss = ce_kd_loss(logits, labels, targets, 3.0, 1.0).loss
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    for batch in batches[:3]:  # warm-up
        step(*batch)
    trained, start = 0, time.perf_counter()
    for batch in batches:
        step(*batch)
        trained += len(batch[2])
    train_rate = trained / (time.perf_counter() - start)

    ratio = loader_rate / train_rate
    verdict = "ok" if ratio >= REQUIRED_RATIO else "TOO SLOW"
    print(f"loader (shuffle + crop/flip augmentation): {loader_rate:10.0f} images/s")
    print(f"edge ResNet-8 training steps:              {train_rate:10.0f} images/s")
    print(f"loader / training: {ratio:.1f}x (required: >= {REQUIRED_RATIO:.0f}x) {verdict}")


if __name__ == "__main__":
    main()
