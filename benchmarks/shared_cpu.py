"""Server training on a shared CPU: samples/s alone and beside one busy process.

    python benchmarks/shared_cpu.py [--samples 640] [--precision float32] [--threads 0 1 2]

For each server thread setting (``torch-threads``: 0 picks the threads from the
process's resources, as the ServerApp does), the server trains ResNet-55 on
``--samples`` stored features (batch 64, ``ServerTrainer`` as the strategy runs
it), first alone, then while a second process that this script starts multiplies
2048x2048 float32 matrices in a loop with torch's default threads (stopped by
process id before the next setting). Prints samples/s alone, beside the busy
process, and their ratio (goal: at least 0.4; a fair share of 2 cores is 0.5).
Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.threads import resolve_threads, use_threads

sys.path.insert(0, os.path.dirname(__file__))

from precision import server_store  # noqa: E402

BUSY = (
    "import torch\n"
    "a = torch.randn(2048, 2048); b = torch.randn(2048, 2048)\n"
    "while True:\n"
    "    a @ b\n"
)


def server_rate(store, precision: str, repeats: int) -> float:
    """Best samples/s of one server epoch over ``store`` (after a warm-up epoch)."""
    trainer = ServerTrainer(10, batch_size=64, seed=0, device="cpu", precision=precision)
    trainer.train(store, epochs=1)
    best = 0.0
    for _ in range(repeats):
        result = trainer.train(store, epochs=1)
        best = max(best, result.samples / result.seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    store = server_store(args.samples)
    print(f"CPUs available to this process: {len(os.sched_getaffinity(0))}")
    print(f"{'torch-threads':>14}{'threads':>9}{'alone':>10}{'beside':>10}{'ratio':>8}")
    for setting in args.threads:
        threads = resolve_threads(setting)
        with use_threads(setting):
            alone = server_rate(store, args.precision, args.repeats)
            busy = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                time.sleep(2.0)  # the busy process is multiplying
                beside = server_rate(store, args.precision, args.repeats)
            finally:
                os.kill(busy.pid, signal.SIGKILL)
                busy.wait()
        print(f"{setting:>14}{threads:>9}{alone:10.1f}{beside:10.1f}{beside / alone:8.2f}")
    print(f"\n(samples/s of ResNet-55 training in {args.precision}, best of {args.repeats})")


if __name__ == "__main__":
    main()
