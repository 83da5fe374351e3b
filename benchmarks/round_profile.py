"""Where a round's wall time goes, FedGKT beside FedAvg, and the wall time to a target.

    python benchmarks/round_profile.py [--seeds 42 43 44] [--rounds 8] [--nodes 3]
        [--output-dir profile] [--target 0.95] [--report-only]

Runs the default digits comparison (``baselines/compare.py``'s runs: FedGKT at the
repository root and ``baselines/fedavg``, each through ``flwr run`` on a local
simulation SuperLink this script starts and stops) once per seed, then prints
from their ``results.json``:

1. the profile of a steady round (rounds 2 and later, mean over rounds and
   seeds), part by part: the phases' waits (messages sent to replies in hand),
   the nodes' own seconds as they report them, the server's validation,
   training, logits and scoring, FedAvg's aggregation; "transport, Flower and
   Ray" is a phase's wait less the nodes' handlers (the simulation runs one
   ClientApp at a time on 2 cores: ``num-cpus = 2`` each);
2. FedGKT's round outside server training against FedAvg's whole round;
3. the wall time to ``--target`` accuracy per seed (the sum of the rounds'
   ``seconds`` up to the first round at or above it), the final accuracies;
4. the server's training throughput (``ServerTrainer`` on 16x32x32 features,
   ResNet-55, batch 64) against this machine's GEMM peak (a 2048x2048 matmul)
   in float32 and in what ``precision = auto`` resolves to here.

This replaces ``round_overhead.py`` (Flower against one process) and
``server_throughput.py`` (``aggregate_train`` against a plain loop): the profile
shows the same overheads part by part, and the server's reference is the
machine's peak. Run it on an otherwise quiet machine (about 2 minutes per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "baselines"))
sys.path.insert(0, str(REPO / "benchmarks"))

from compare import Settings, run_all  # noqa: E402
from precision import DTYPES, gemm_peak, server_store  # noqa: E402

from flwr_fedgkt.accounting import count_flops  # noqa: E402
from flwr_fedgkt.models import build_model  # noqa: E402
from flwr_fedgkt.precision import resolve_precision  # noqa: E402
from flwr_fedgkt.server import ServerTrainer  # noqa: E402

ALGORITHMS = ("fedgkt", "fedavg")
ROWS = [
    ("node_handler", "nodes: message handlers, in all (sum over nodes)"),
    ("node_train", "  of which edge / local training"),
    ("node_extract", "  of which extraction (training + test data)"),
    ("node_encode", "  of which encoding and compression"),
    ("node_evaluate", "nodes: evaluation handlers (sum)"),
    ("transport", "transport, Flower and Ray (phase waits less node handlers)"),
    ("validate", "server: decoding and validating replies"),
    ("aggregate", "server: FedAvg's aggregation"),
    ("server_train", "server: training"),
    ("server_logits", "server: logits for the nodes"),
    ("score", "server: scoring test features"),
    ("other", "the rest (sampling, messages, records, checkpoints)"),
    ("seconds", "round"),
]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def steady_profile(rounds: list[dict]) -> dict[str, float]:
    """Mean seconds per part over rounds 2 and later (all when there is one)."""
    steady = [r for r in rounds if r["round"] >= 2] or rounds
    parts: dict[str, list[float]] = {}
    for record in steady:
        profile = dict(record.get("profile", {}))
        waits = profile.get("train_wait", 0.0) + profile.get("evaluate_wait", 0.0)
        handlers = profile.get("node_handler", 0.0) + profile.get("node_evaluate", 0.0)
        profile["transport"] = max(0.0, waits - handlers)
        server = sum(
            profile.get(k, 0.0)
            for k in ("validate", "aggregate", "server_train", "server_logits", "score")
        )
        profile["other"] = max(0.0, record["seconds"] - waits - server)
        profile["seconds"] = record["seconds"]
        for key, _ in ROWS:
            parts.setdefault(key, []).append(float(profile.get(key, 0.0)))
    return {key: statistics.fmean(values) for key, values in parts.items()}


def seconds_to(rounds: list[dict], target: float) -> tuple[float | None, int | None]:
    """Wall time (sum of round seconds) up to the first round at or above ``target``."""
    total = 0.0
    for record in rounds:
        total += float(record["seconds"])
        if record.get("accuracy") is not None and record["accuracy"] >= target:
            return total, int(record["round"])
    return None, None


def mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def report(output_dir: Path, seeds: list[int], target: float) -> None:
    runs = {
        (seed, algorithm): load(output_dir / f"seed-{seed}" / "iid" / algorithm / "results.json")
        for seed in seeds
        for algorithm in ALGORITHMS
    }
    profiles = {
        algorithm: [steady_profile(runs[(seed, algorithm)]["rounds"]) for seed in seeds]
        for algorithm in ALGORITHMS
    }
    mean = {
        algorithm: {key: statistics.fmean(p[key] for p in profiles[algorithm]) for key, _ in ROWS}
        for algorithm in ALGORITHMS
    }
    precision = runs[(seeds[0], "fedgkt")].get("server_precision", "?")
    print(f"\nA steady round (rounds >= 2; mean over {len(seeds)} seeds), seconds")
    print(f"FedGKT's server trains in {precision} (precision = auto); FedAvg's nodes in float32\n")
    print("| part | FedGKT | FedAvg |\n|---|---|---|")
    for key, label in ROWS:
        gkt, avg = mean["fedgkt"][key], mean["fedavg"][key]
        if gkt == 0.0 and avg == 0.0:
            continue
        print(f"| {label} | {gkt:.2f} | {avg:.2f} |")
    outside = mean["fedgkt"]["seconds"] - mean["fedgkt"]["server_train"]
    print(
        f"\nFedGKT's round outside server training: {outside:.2f} s = "
        f"{outside / mean['fedavg']['seconds']:.2f}x FedAvg's round "
        f"({mean['fedavg']['seconds']:.2f} s)"
    )
    print(f"\nWall time to {target:.0%} (sum of round seconds), per seed")
    print("| seed | FedGKT s (round) | FedAvg s (round) | FedGKT final | FedAvg final |")
    print("|---|---|---|---|---|")
    reach: dict[str, list[float]] = {a: [] for a in ALGORITHMS}
    final: dict[str, list[float]] = {a: [] for a in ALGORITHMS}
    for seed in seeds:
        cells = []
        for algorithm in ALGORITHMS:
            rounds = runs[(seed, algorithm)]["rounds"]
            seconds, at = seconds_to(rounds, target)
            if seconds is not None:
                reach[algorithm].append(seconds)
            cells.append("not reached" if seconds is None else f"{seconds:.1f} ({at})")
            final[algorithm].append(100 * float(rounds[-1]["accuracy"]))
        print(
            f"| {seed} | {cells[0]} | {cells[1]} | {final['fedgkt'][-1]:.2f} % "
            f"| {final['fedavg'][-1]:.2f} % |"
        )
    print(
        f"| mean ± sd | {mean_sd(reach['fedgkt'])} | {mean_sd(reach['fedavg'])} "
        f"| {mean_sd(final['fedgkt'])} % | {mean_sd(final['fedavg'])} % |"
    )


def server_against_peak(samples: int = 640, repeats: int = 2) -> None:
    """The server's training throughput as a fraction of the GEMM peak."""
    torch.manual_seed(0)
    flops = count_flops(build_model("resnet55", 10), (16, 32, 32))[1]
    store = server_store(samples)
    auto = resolve_precision("auto", torch.device("cpu"))
    print(
        f"\nServer training against the GEMM peak ({torch.get_num_threads()} threads; "
        f"precision = auto resolves to {auto} here)"
    )
    print(
        "| precision | samples/s | GFLOP/s | GEMM peak GFLOP/s | of peak |\n|---|---|---|---|---|"
    )
    for precision in dict.fromkeys(["float32", auto]):
        peak = gemm_peak(DTYPES[precision])
        trainer = ServerTrainer(10, batch_size=64, seed=0, device="cpu", precision=precision)
        trainer.train(store, epochs=1)  # warm-up
        rate = max(
            (r := trainer.train(store, epochs=1)).samples / r.seconds for _ in range(repeats)
        )
        gflops = rate * flops / 1e9
        print(f"| {precision} | {rate:.1f} | {gflops:.1f} | {peak:.1f} | {gflops / peak:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--output-dir", type=Path, default=Path("profile"))
    parser.add_argument("--shared-config", default="", help="extra --run-config for both")
    parser.add_argument("--fedgkt-config", default="", help="extra --run-config for FedGKT")
    parser.add_argument("--report-only", action="store_true", help="only read the results")
    parser.add_argument("--no-server", action="store_true", help="skip the GEMM-peak part")
    args = parser.parse_args()
    output_dir = args.output_dir.resolve()
    if not args.report_only:
        for seed in args.seeds:
            settings = Settings(
                partitioners=("iid",),
                nodes=args.nodes,
                rounds=args.rounds,
                seed=seed,
                shared_config=args.shared_config,
                fedgkt_config=args.fedgkt_config,
            )
            run_all(settings, output_dir / f"seed-{seed}", REPO, timeout=3600, quiet=True)
    report(output_dir, args.seeds, args.target)
    if not args.no_server:
        server_against_peak()


if __name__ == "__main__":
    main()
