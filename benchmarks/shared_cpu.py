"""Server training on a shared CPU: samples/s alone and beside one busy process.

    python benchmarks/shared_cpu.py [--samples 640] [--precision float32] [--threads 0 1 2]

For each server thread setting (``torch-threads``: 0 picks the threads from the
process's resources, as the ServerApp does), the server trains ResNet-55 on
``--samples`` stored features (batch 64, ``ServerTrainer`` as the strategy runs
it), first alone, then while a second process that this script starts multiplies
2048x2048 float32 matrices in a loop with torch's default threads (stopped by
process id before the next setting). Prints samples/s alone, beside the busy
process, and their ratio (goal: at least 0.4; a fair share of 2 cores is 0.5),
and each setting's rate beside the busy process against the default's (0) rate
alone: what a user gets from the setting on a shared CPU.
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
from flwr_fedgkt.threads import resolve_threads

sys.path.insert(0, os.path.dirname(__file__))

from precision import server_store  # noqa: E402

BUSY = (
    "import torch\n"
    "a = torch.randn(2048, 2048); b = torch.randn(2048, 2048)\n"
    "while True:\n"
    "    a @ b\n"
)


def rates(store, precision: str, repeats: int, setting: int) -> tuple[float, float]:
    """Best samples/s of a server epoch over ``store`` alone and beside the busy
    process (``torch-threads = setting``). The busy process runs throughout and
    is paused (SIGSTOP) for the epochs alone and resumed (SIGCONT) for those beside
    it, alternating, so that both see the same machine."""
    trainer = ServerTrainer(
        10, batch_size=64, seed=0, device="cpu", precision=precision, torch_threads=setting
    )
    trainer.train(store, epochs=1)  # warm-up
    best = {"alone": 0.0, "beside": 0.0}
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(2.0)  # the busy process has started multiplying
        for _ in range(repeats):
            for case in ("alone", "beside"):
                os.kill(busy.pid, signal.SIGSTOP if case == "alone" else signal.SIGCONT)
                time.sleep(0.5)
                result = trainer.train(store, epochs=1)
                best[case] = max(best[case], result.samples / result.seconds)
    finally:
        os.kill(busy.pid, signal.SIGKILL)
        busy.wait()
    return best["alone"], best["beside"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    store = server_store(args.samples)
    print(f"CPUs available to this process: {len(os.sched_getaffinity(0))}")
    print(
        f"{'torch-threads':>14}{'threads':>9}{'alone':>10}{'beside':>10}{'ratio':>8}"
        f"{'vs first alone':>16}"
    )
    first = None
    for setting in args.threads:
        alone, beside = rates(store, args.precision, args.repeats, setting)
        first = alone if first is None else first
        print(
            f"{setting:>14}{resolve_threads(setting):>9}{alone:10.1f}{beside:10.1f}"
            f"{beside / alone:8.2f}{beside / first:16.2f}"
        )
    print(
        f"\n(samples/s of ResNet-55 training in {args.precision}, best of {args.repeats} "
        "alternating epochs alone and beside)"
    )


if __name__ == "__main__":
    main()
