"""Training throughput in float32 and bfloat16, against this machine's GEMM peak.

    python benchmarks/precision.py [--steps 12] [--threads 2]

Prints, side by side and measured in this one run: the server's training
(ResNet-55 on 16x32x32 features, batch 64, channels-last, Adam, CE + KD) and the
edge's training (ResNet-8 on 3x32x32 images, batch 32, Adam, CE + KD) in samples/s
with ``precision`` float32 and bfloat16 (``ServerTrainer`` / ``EdgeTrainer`` as the
strategy and the nodes run them), each also as GFLOP/s (training FLOPs counted
with ``torch.utils.flop_counter``) and as a fraction of the peak of a large
matmul in the same dtype. The two precisions alternate, so that both see the
same machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from flwr_fedgkt.accounting import count_flops
from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.edge import EdgeTrainer, LogitTable
from flwr_fedgkt.models import build_model
from flwr_fedgkt.precision import cpu_has_native_bfloat16
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a ``size`` x ``size`` matmul in ``dtype`` (best of ``repeats``)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def server_store(samples: int) -> FeatureStore:
    gen = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(samples, 16, 32, 32, generator=gen))
    arrays = encode_features(features, "float32").arrays()
    arrays.update(
        logits=torch.randn(samples, 10, generator=gen).numpy(),
        labels=torch.randint(0, 10, (samples,), generator=gen).numpy(),
        ids=torch.arange(samples).numpy(),
    )
    store = FeatureStore()
    store.put("a", validate_payload(arrays, "float32", (16, 32, 32), 10), 1)
    return store


def server_rate(precision: str, store: FeatureStore, batch: int) -> float:
    trainer = ServerTrainer(10, batch_size=batch, seed=0, device="cpu", precision=precision)
    trainer.train(store, epochs=1)  # warm-up (and the first steps' allocations)
    result = trainer.train(store, epochs=1)
    return result.samples / result.seconds


def edge_rate(precision: str, data: SampleSet, teacher: LogitTable, batch: int) -> float:
    trainer = EdgeTrainer(10, device="cpu", seed=0, precision=precision)
    trainer.train(data, epochs=1, batch_size=batch, teacher=teacher)  # warm-up
    start = time.perf_counter()
    trainer.train(data, epochs=1, batch_size=batch, teacher=teacher)
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    server_batch, edge_batch = 64, 32
    store = server_store(server_batch * args.steps)
    gen = torch.Generator().manual_seed(1)
    n = edge_batch * args.steps
    data = SampleSet(
        torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,)), torch.arange(n)
    )
    teacher = LogitTable(torch.arange(n), torch.randn(n, 10, generator=gen))
    flops = {
        "server": count_flops(build_model("resnet55", 10), (16, 32, 32))[1],
        "edge": count_flops(build_model("resnet8", 10), (3, 32, 32))[1],
    }
    print(
        f"threads {args.threads}, CPU with native bfloat16: {cpu_has_native_bfloat16()}; "
        f"training MFLOPs per sample: server {flops['server'] / 1e6:.0f}, "
        f"edge {flops['edge'] / 1e6:.1f}"
    )
    peaks = {name: gemm_peak(dtype) for name, dtype in DTYPES.items()}
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for precision in DTYPES:
            rates.setdefault(("server", precision), []).append(
                server_rate(precision, store, server_batch)
            )
            rates.setdefault(("edge", precision), []).append(
                edge_rate(precision, data, teacher, edge_batch)
            )
    header = f"{'precision':>10}{'samples/s':>12}{'GFLOP/s':>10}{'GEMM peak':>11}{'of peak':>9}"
    print(f"\n{'':8}{header}")
    for side in ("server", "edge"):
        for precision in DTYPES:
            rate = max(rates[(side, precision)])
            gflops = rate * flops[side] / 1e9
            peak = peaks[precision]
            print(
                f"{side:8}{precision:>10}{rate:12.1f}{gflops:10.1f}{peak:11.1f}{gflops / peak:9.2f}"
            )
        speedup = max(rates[(side, "bfloat16")]) / max(rates[(side, "float32")])
        print(f"{side:8}{'bf16/fp32':>10}{speedup:12.2f}x")
    print("\n(best of the alternating measurements; GEMM peak: 2048x2048 matmul)")


if __name__ == "__main__":
    main()
