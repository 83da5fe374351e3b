"""Slow nodes: FedGKT's three schedules and Flower's FedAvg, by wall time.

    python benchmarks/stragglers.py [--seeds 42 43 44] [--budget 150] [--slow 0,1]
        [--slowdown 4] [--partitioners iid dirichlet] [--out DIR] [--report-only]

Flower's simulation engine on a local SuperLink (its own FLWR_HOME and free
ports; every process stopped by id at the end), six simulated SuperNodes whose
ClientApps run side by side (one CPU each in Ray's count, so none waits for
another). Once a run has written its first record (Ray's start-up and the
ClientApps' imports use both cores alike for every method), the ServerApp's
process is pinned to core 1 and Ray's worker processes, the nodes' ClientApps,
to core 0, every process with one torch / OpenMP thread: the server's training
and the nodes' then take none of each other's CPU, as on separate machines. (A
deployment starts a new ClientApp process per message, whose start-up, six at
a time on one core, would outweigh the training measured here.) Partitions
``--slow`` are stragglers: each waits ``slowdown - 1`` times its training time
after training, using no CPU (``slow-partitions`` / ``slowdown``).

For each partitioner (``digits``: IID, Dirichlet 0.5) and seed, every method
runs with the same ``time-budget`` and ``client-epochs`` (default 4: each node's
part of a round outweighs the server's epoch, as on slow devices; the rest at
the package's defaults): FedGKT with ``mode`` = ``sync``,
``pipeline`` and ``async`` (``eval-every = 1``), FedAvg (``baselines/fedavg``)
without a round timeout, and FedAvg with ``round-timeout`` =
``--fedavg-timeout`` (default: half the median training wait of the FedAvg run
of the same setting and seed, so that the slow nodes' replies miss it and are
dropped). With
``--no-slow``, the same for the IID split without slow nodes (pipeline, async).
Each run's results.json goes to ``--out`` (a run whose results exist is not run
again, so an interrupted benchmark continues where it stopped).

Prints, per setting and method over the seeds (mean and sd; a seed that never
reached a target counts as "not reached" and is left out of the mean): wall
seconds to 95 % and to 97 % test accuracy, the accuracy of the newest record
within the budget, bytes up and down within the budget; and writes
``stragglers.png`` (mean accuracy against wall time, one line per method) and
each setting's table to ``<setting>/table.md``. Wall time counts from the run's
first round (FedGKT: ``wall_seconds``; FedAvg the same), so the ServerApp's
start-up is left out alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from local_flower import REPO, flower_environment, start_local_superlink  # noqa: E402

NODES = 6
FEDAVG = REPO / "baselines" / "fedavg"
METHODS = {
    "fedgkt-sync": (REPO, {"mode": "sync"}),
    "fedgkt-pipeline": (REPO, {"mode": "pipeline"}),
    "fedgkt-async": (REPO, {"mode": "async"}),
    "fedavg": (FEDAVG, {}),
    "fedavg-timeout": (FEDAVG, {}),  # round-timeout set from --fedavg-timeout
}
TARGETS = (0.95, 0.97)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def _pin(pid: str, cores: set[int]) -> None:
    """Every thread of process ``pid`` on ``cores``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        if os.sched_getaffinity(int(tid)) != cores:
            os.sched_setaffinity(int(tid), cores)


def pin_processes(stop: threading.Event, warm: Callable[[], bool]) -> None:
    """Until ``stop``, once ``warm()`` (the run's first record is written, so
    that Ray's start-up and the ClientApps' imports use both cores): every
    thread of every Ray worker process (the simulated nodes' ClientApps) on core
    0, of the simulation process (the ServerApp) on core 1."""
    while not stop.wait(0.3):
        if not warm():
            continue
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if b"default_worker.py" in command or command.startswith(b"ray::"):
                    _pin(pid, {0})
                elif b"flwr-simulation" in command:
                    _pin(pid, {1})
            except OSError:  # the process or thread has ended
                continue


def run_config(method: str, partitioner: str, seed: int, args, slow: bool, out: Path) -> str:
    values: dict[str, object] = {
        "dataset": "digits",
        "partitioner": partitioner,
        "dirichlet-alpha": 0.5,
        "seed": seed,
        "num-server-rounds": 10000,
        "client-epochs": args.client_epochs,
        "time-budget": float(args.budget),
        "min-train-nodes": NODES,
        "min-evaluate-nodes": NODES,
        "min-available-nodes": NODES,
        "slow-partitions": args.slow if slow else "",
        "slowdown": float(args.slowdown),
        "output-dir": str(out),
        "torch-threads": 1,
        **METHODS[method][1],
    }
    if method == "fedavg-timeout":
        timeout = args.fedavg_timeout or auto_timeout(out.parent.parent / "fedavg" / out.name)
        values["round-timeout"] = timeout
    return " ".join(f"{key}={_toml(value)}" for key, value in values.items())


def auto_timeout(fedavg_run: Path) -> float:
    """Half the median training wait of FedAvg's rounds after the first in the
    same setting and seed: about twice a fast node's round, well short of a slow
    node's (``slowdown`` = 4)."""
    rounds = json.loads((fedavg_run / "results.json").read_text())["rounds"][1:]
    waits = [r["profile"]["train_wait"] for r in rounds if "train_wait" in r.get("profile", {})]
    if not waits:
        raise SystemExit(f"no FedAvg rounds in {fedavg_run} to set the timeout from")
    return round(0.5 * statistics.median(waits), 1)


def run_one(env: dict[str, str], method: str, config: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "flwr-run.log"
    federation = f"num-supernodes={NODES} client-resources-num-cpus=1 init-args-num-cpus={NODES}"
    with open(log_file, "w") as handle:
        subprocess.run(
            ["flwr", "run", str(METHODS[method][0]), "--stream"]
            + ["--federation-config", federation, "--run-config", config],
            env=env,
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=3600,
            check=False,
        )
    path = out / "results.json"
    if not done(path) or "Exit Code" in log_file.read_text():
        raise SystemExit(f"{method}: the run failed, see {log_file}")
    return json.loads(path.read_text())


def done(path: Path) -> bool:
    """Whether ``path`` holds the results of a run that completed."""
    return path.exists() and json.loads(path.read_text()).get("status") == "completed"


# -- figures ---------------------------------------------------------------------------
def within(records: list[dict], budget: float) -> list[dict]:
    return [r for r in records if r.get("accuracy") is not None and r["wall_seconds"] <= budget]


def time_to(records: list[dict], target: float) -> float | None:
    for record in records:
        if record["accuracy"] >= target:
            return float(record["wall_seconds"])
    return None


def total_bytes(records: list[dict]) -> tuple[int, int]:
    return sum(int(r["bytes_up"]) for r in records), sum(int(r["bytes_down"]) for r in records)


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    got = [v * scale for v in values if v is not None]
    missing = len(values) - len(got)
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.{digits}f}"
    if len(got) > 1:
        text += f" ± {statistics.stdev(got):.{digits}f}"
    if missing:
        text += f" ({missing} not reached)"
    return text


SETTINGS_ORDER = ("iid-slow", "dirichlet-slow", "iid-no-slow")


def _runs(root: Path, setting: str, method: str, seeds: list[int], budget: float) -> list:
    """Each seed's records within the budget, for the seeds that have results."""
    runs = []
    for seed in seeds:
        path = root / setting / method / f"seed-{seed}" / "results.json"
        if path.exists():
            runs.append(within(json.loads(path.read_text())["rounds"], budget))
    return runs


def report(root: Path, settings: list[str], methods: list[str], seeds: list[int], budget: float):
    """Print and write (``<setting>/table.md``) the table of each of ``settings``;
    plot every setting ``root`` holds (``stragglers.png``), so that the picture
    stays whole whichever command wrote last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded: dict[tuple[str, str], list] = {}  # the table and the plot read each run once

    def runs_of(setting: str, method: str) -> list:
        if (setting, method) not in loaded:
            loaded[setting, method] = _runs(root, setting, method, seeds, budget)
        return loaded[setting, method]

    for setting in settings:
        table = [
            f"{setting} (budget {budget:g} s, seeds {seeds})",
            "| method | s to 95 % | s to 97 % | accuracy at budget (%) | MB up | MB down |",
            "|---|---|---|---|---|---|",
        ]
        for method in methods:
            runs = runs_of(setting, method)
            if not runs:
                continue
            to95 = [time_to(r, 0.95) for r in runs]
            to97 = [time_to(r, 0.97) for r in runs]
            final = [r[-1]["accuracy"] if r else None for r in runs]
            up = [total_bytes(r)[0] / 1e6 for r in runs]
            down = [total_bytes(r)[1] / 1e6 for r in runs]
            table.append(
                f"| {method} | {fmt(to95)} | {fmt(to97)} | {fmt(final, 100, 2)} | "
                f"{fmt(up, 1, 0)} | {fmt(down, 1, 0)} |"
            )
        print("\n" + "\n".join(table))
        (root / setting).mkdir(parents=True, exist_ok=True)
        (root / setting / "table.md").write_text("\n".join(table) + "\n")
    shown = [s for s in SETTINGS_ORDER if (root / s).is_dir() or s in settings]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.2), squeeze=False)
    grid = [budget * i / 200 for i in range(201)]
    for ax, setting in zip(axes[0], shown, strict=True):
        for method in METHODS:
            runs = runs_of(setting, method)
            if not runs:
                continue
            curves = []
            for records in runs:
                curve, newest = [], None
                for t in grid:
                    for r in records:
                        if r["wall_seconds"] <= t:
                            newest = r["accuracy"]
                    curve.append(float("nan") if newest is None else 100 * newest)
                curves.append(curve)
            mean = [statistics.mean(values) for values in zip(*curves, strict=True)]
            ax.plot(grid, mean, label=method)
        ax.set_title(setting)
        ax.set_xlabel("wall seconds")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.set_ylim(0, 100)
        ax.axhline(95, color="grey", linewidth=0.5)
        ax.legend()
    fig.tight_layout()
    fig.savefig(root / "stragglers.png", dpi=110)
    print(f"\nplot: {root / 'stragglers.png'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--budget", type=float, default=150.0)
    parser.add_argument("--slow", default="0,1", help="the slow partitions")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument(
        "--client-epochs",
        type=int,
        default=4,
        help="edge epochs per instruction: the nodes' side outweighs the server's, as on devices",
    )
    parser.add_argument(
        "--fedavg-timeout",
        type=float,
        default=0.0,
        help="FedAvg's round timeout; 0: half the median training wait of the FedAvg run",
    )
    parser.add_argument(
        "--partitioners",
        nargs="*",
        choices=["iid", "dirichlet"],
        default=["iid", "dirichlet"],
        help="the settings with slow nodes (none: only --no-slow's)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--no-slow", action="store_true", help="also IID without slow nodes")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "stragglers")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; known: {sorted(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = [(p, True, args.methods) for p in args.partitioners]
    if args.no_slow:
        plan.append(("iid", False, [m for m in args.methods if m.startswith("fedgkt-")]))
    settings = [f"{p}-{'slow' if slow else 'no-slow'}" for p, slow, _ in plan]
    if not args.report_only:
        current: dict[str, Path] = {}

        def warm() -> bool:
            path = current.get("results")
            if path is None or not path.exists():
                return False
            try:
                return bool(json.loads(path.read_text()).get("rounds"))
            except ValueError:  # being written
                return False

        pinning = threading.Event()
        threading.Thread(target=pin_processes, args=(pinning, warm), daemon=True).start()
        with tempfile.TemporaryDirectory(prefix="fedgkt-stragglers-") as scratch:
            workdir = Path(scratch)
            with flower_environment(workdir) as env:
                start_local_superlink(env, workdir / "superlink.log")
                try:
                    for (partitioner, slow, methods), setting in zip(plan, settings, strict=True):
                        for seed in args.seeds:
                            for method in methods:
                                out = args.out / setting / method / f"seed-{seed}"
                                if done(out / "results.json"):
                                    continue
                                current["results"] = out / "results.json"
                                config = run_config(method, partitioner, seed, args, slow, out)
                                print(f"[{setting} seed {seed}] {method}", flush=True)
                                run_one(env, method, config, out)
                finally:
                    pinning.set()
    report(args.out, settings, args.methods, args.seeds, args.budget)


if __name__ == "__main__":
    main()
