"""FedGKT against FedAvg, side by side, from one command.

Run from the repository root, after ``pip install -e .``::

    python baselines/compare.py --output-dir baselines/_static/digits

It runs FedGKT (the Flower App at the repository root) and the FedAvg baseline
(``baselines/fedavg``) with one shared configuration (data set, partitioner,
Dirichlet alpha, nodes, rounds, client epochs, seed) on Flower's simulation
engine, each through ``flwr run``, and writes into one folder::

    <output-dir>/
        comparison.md            the table (all settings), definitions, plot links
        summary.json             the table's figures, machine-readable
        superlink.log            the local SuperLink's and SuperExec's log
        <setting>/               "iid" or "dirichlet-<alpha>"
            fedgkt/results.json  fedgkt/flwr-run.log
            fedavg/results.json  fedavg/flwr-run.log
            accuracy.png         test accuracy per round, both algorithms
            bytes.png            bytes per client per round, up and down
            edge_compute.png     edge FLOPs per round; accuracy against edge FLOPs

The command starts its own local SuperLink with a private ``FLWR_HOME`` and free
ports, and stops every process it started, by process id, when it is done or
fails (``tools/local_flower.py``). ``--report-only`` rebuilds the table and plots
from existing results.

This is development tooling, not part of the ``flwr_fedgkt`` package. It imports
no Flower code: it drives Flower's command-line tools.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr_fedgkt.accounting import edge_round_flops
from flwr_fedgkt.models import FULL_MODEL_OF
from flwr_fedgkt.results import write_json_atomic

_TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)

from local_flower import REPO, flower_environment, flwr_run, start_local_superlink  # noqa: E402

__all__ = [
    "Settings",
    "RunSummary",
    "main",
    "parse_args",
    "run_config_string",
    "setting_name",
    "summarise",
    "markdown_table",
    "plot_setting",
    "write_report",
]

ALGORITHMS = ("fedgkt", "fedavg")
LABELS = {"fedgkt": "FedGKT", "fedavg": "FedAvg"}
COLOURS = {"fedgkt": "tab:blue", "fedavg": "tab:orange"}
FULL_MODEL = FULL_MODEL_OF
MB = 1e6


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What both algorithms share in a comparison."""

    dataset: str = "digits"
    partitioners: tuple[str, ...] = ("iid", "dirichlet")
    dirichlet_alpha: float = 0.5
    nodes: int = 3
    rounds: int = 8
    client_epochs: int = 1
    seed: int = 42
    server_model: str = "resnet55"
    shared_config: str = ""
    fedgkt_config: str = ""
    fedavg_config: str = ""
    algorithms: tuple[str, ...] = ALGORITHMS

    def shared(self, partitioner: str) -> dict[str, Any]:
        """The run-config keys both runs of one setting get, with the same values."""
        return {
            "num-server-rounds": self.rounds,
            "dataset": self.dataset,
            "partitioner": partitioner,
            "dirichlet-alpha": self.dirichlet_alpha,
            "client-epochs": self.client_epochs,
            "seed": self.seed,
            "fraction-train": 1.0,
            "fraction-evaluate": 1.0,
            "min-train-nodes": self.nodes,
            "min-evaluate-nodes": self.nodes,
            "min-available-nodes": self.nodes,
        }


def setting_name(partitioner: str, dirichlet_alpha: float) -> str:
    """Folder name of one setting: ``iid``, ``dirichlet-0.5``, ..."""
    if partitioner == "dirichlet":
        return f"dirichlet-{dirichlet_alpha:g}"
    return partitioner


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" in text:
        raise ValueError(f"run-config value {text!r} must not contain a single quote")
    return f"'{text}'"


def run_config_string(values: dict[str, Any], extra: str = "") -> str:
    """``--run-config`` text: ``key=value`` pairs (strings quoted), then ``extra``."""
    text = " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())
    return f"{text} {extra}".strip()


def algorithm_config(settings: Settings, algorithm: str, partitioner: str, output_dir: Path) -> str:
    """The ``--run-config`` of one algorithm in one setting."""
    values = settings.shared(partitioner)
    values["output-dir"] = str(output_dir)
    if algorithm == "fedgkt":
        values["server-model"] = settings.server_model
        extra = f"{settings.shared_config} {settings.fedgkt_config}"
    else:
        values["model"] = FULL_MODEL[settings.server_model]
        extra = f"{settings.shared_config} {settings.fedavg_config}"
    return run_config_string(values, extra.strip())


# -- running -----------------------------------------------------------------------


def app_dirs(repo: Path) -> dict[str, Path]:
    """The two Flower Apps: FedGKT at the repository root, FedAvg under baselines."""
    apps = {"fedgkt": repo, "fedavg": repo / "baselines" / "fedavg"}
    for algorithm, path in apps.items():
        if not (path / "pyproject.toml").is_file():
            raise FileNotFoundError(
                f"no Flower App for {algorithm} at {path}: pass --repo <checkout of flwr-fedgkt>"
            )
    return apps


def _check_results(path: Path, rounds: int, log_file: Path) -> None:
    try:
        done = len(json.loads(path.read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        done = 0
    if done < rounds:
        tail = log_file.read_text()[-3000:] if log_file.exists() else ""
        raise RuntimeError(f"{path} holds {done} of {rounds} rounds; see {log_file}:\n{tail}")


def run_all(
    settings: Settings,
    output_dir: Path,
    repo: Path,
    timeout: float,
    quiet: bool = False,
    flower_home: Path | None = None,
) -> dict[str, float]:
    """Run every algorithm on every setting, one after another, on one local
    SuperLink; return the wall time of each run (seconds, by ``setting/algorithm``).

    Flower's state (``FLWR_HOME``) goes to ``flower_home`` when given, else to a
    temporary directory that is deleted afterwards.
    """
    apps = app_dirs(repo)
    durations: dict[str, float] = {}

    def echo(prefix: str):
        def on_line(line: str) -> None:
            if not quiet and ("round " in line and ":" in line or "ERROR" in line):
                print(f"[{prefix}] {line.strip()}", flush=True)

        return on_line

    with tempfile.TemporaryDirectory(prefix="flwr-compare-") as scratch:
        workdir = Path(flower_home) if flower_home is not None else Path(scratch)
        with flower_environment(workdir) as env:
            start_local_superlink(env, output_dir / "superlink.log")
            for partitioner in settings.partitioners:
                name = setting_name(partitioner, settings.dirichlet_alpha)
                for algorithm in settings.algorithms:
                    run_dir = output_dir / name / algorithm
                    run_dir.mkdir(parents=True, exist_ok=True)
                    (run_dir / "results.json").unlink(missing_ok=True)
                    log_file = run_dir / "flwr-run.log"
                    config = algorithm_config(settings, algorithm, partitioner, run_dir)
                    if not quiet:
                        print(f"[{name}/{algorithm}] flwr run {apps[algorithm]}", flush=True)
                    start = time.perf_counter()
                    result = flwr_run(
                        env,
                        apps[algorithm],
                        config,
                        settings.nodes,
                        timeout=timeout,
                        log_file=log_file,
                        on_line=echo(f"{name}/{algorithm}"),
                    )
                    durations[f"{name}/{algorithm}"] = time.perf_counter() - start
                    if result.returncode != 0:
                        raise RuntimeError(
                            f"flwr run for {name}/{algorithm} exited with "
                            f"{result.returncode}; see {log_file}"
                        )
                    _check_results(run_dir / "results.json", settings.rounds, log_file)
                    if not quiet:
                        print(
                            f"[{name}/{algorithm}] done in "
                            f"{durations[f'{name}/{algorithm}']:.0f} s",
                            flush=True,
                        )
    return durations


# -- figures -----------------------------------------------------------------------


@dataclass
class RunSummary:
    """The comparison's figures for one algorithm in one setting."""

    setting: str
    algorithm: str
    edge_model: str
    rounds: list[int]
    accuracy: list[float | None]
    edge_accuracy: list[float | None]
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    edge_params: int
    edge_train_flops_per_sample: float
    edge_forward_flops_per_sample: float
    server_model: str | None
    server_params: int | None
    up_per_client: list[float]  # bytes, per round
    down_per_client: list[float]
    up_per_client_train: list[float | None]
    down_per_client_train: list[float | None]
    edge_flops: list[float]  # per round, all clients
    seconds: list[float]
    run_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_up(self) -> float:
        return _mean(self.up_per_client)

    @property
    def mean_down(self) -> float:
        return _mean(self.down_per_client)

    @property
    def total_edge_flops(self) -> float:
        return float(sum(self.edge_flops))

    @property
    def seconds_per_round(self) -> float:
        return _mean(self.seconds)

    @property
    def cumulative_bytes(self) -> list[float]:
        """Bytes per client, up and down, summed over the rounds so far."""
        total, out = 0.0, []
        for up, down in zip(self.up_per_client, self.down_per_client, strict=True):
            total += up + down
            out.append(total)
        return out

    def bytes_to_reach(self, target: float | None) -> float | None:
        """Bytes per client (up and down) moved until test accuracy first reached
        ``target``; None when it never did."""
        if target is None:
            return None
        for spent, accuracy in zip(self.cumulative_bytes, self.accuracy, strict=True):
            if accuracy is not None and accuracy >= target - 1e-12:
                return spent
        return None

    def edge_flops_to_reach(self, target: float | None) -> float | None:
        """Edge FLOPs (all clients) spent until test accuracy first reached ``target``."""
        if target is None:
            return None
        spent = 0.0
        for flops, accuracy in zip(self.edge_flops, self.accuracy, strict=True):
            spent += flops
            if accuracy is not None and accuracy >= target - 1e-12:
                return spent
        return None


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _client_count(record: dict[str, Any]) -> int:
    return max(int(record.get("train_nodes") or 0), int(record.get("eval_nodes") or 0), 1)


def _per_client(record: dict[str, Any], key: str) -> float | None:
    """Mean bytes per client of ``key`` in one round: from the per-client figures
    when the record has them, else the round's total over its nodes."""
    clients = record.get("per_client")
    if clients:
        if key not in clients[0]:
            return None
        return _mean([float(c[key]) for c in clients])
    if key not in record:
        return None
    return float(record[key]) / _client_count(record)


def summarise(results: dict[str, Any], setting: str) -> RunSummary:
    """The figures of one run's ``results.json``."""
    algorithm = str(results.get("algorithm", "?"))
    config = results.get("config", {})
    epochs = int(config.get("client-epochs", 1))
    edge = results["edge_model"]
    server = results.get("server_model") or None
    rounds = results["rounds"]
    edge_flops = []
    for record in rounds:
        train_samples = int(record.get("train_samples", record.get("stored_samples", 0)) or 0)
        eval_samples = int(record.get("eval_samples", 0) or 0)
        if algorithm == "fedgkt":
            # edge training, feature extraction over the training split, and over the test split
            forward = [train_samples, eval_samples]
        else:
            forward = [eval_samples]  # evaluation of the global model
        edge_flops.append(edge_round_flops(edge, train_samples, epochs, forward))
    accuracy = [r.get("accuracy") for r in rounds]
    scored = [(a, r["round"]) for a, r in zip(accuracy, rounds, strict=True) if a is not None]
    best = max(scored, key=lambda item: item[0]) if scored else (None, None)
    return RunSummary(
        setting=setting,
        algorithm=algorithm,
        edge_model=str(edge["name"]),
        rounds=[int(r["round"]) for r in rounds],
        accuracy=accuracy,
        edge_accuracy=[r.get("edge_accuracy") for r in rounds],
        final_accuracy=accuracy[-1] if accuracy else None,
        best_accuracy=best[0],
        best_round=best[1],
        edge_params=int(edge["params"]),
        edge_train_flops_per_sample=float(edge["train_flops_per_sample"]),
        edge_forward_flops_per_sample=float(edge["forward_flops_per_sample"]),
        server_model=None if server is None else str(server["name"]),
        server_params=None if server is None else int(server["params"]),
        up_per_client=[_per_client(r, "bytes_up") or 0.0 for r in rounds],
        down_per_client=[_per_client(r, "bytes_down") or 0.0 for r in rounds],
        up_per_client_train=[_per_client(r, "bytes_up_train") for r in rounds],
        down_per_client_train=[_per_client(r, "bytes_down_train") for r in rounds],
        edge_flops=edge_flops,
        seconds=[float(r.get("seconds") or 0.0) for r in rounds],
    )


# -- table -------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MB:.3f}"


def _flops(value: float | None, unit: float = 1e12) -> str:
    return "not reached" if value is None else f"{value / unit:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    ratio = a / b
    if ratio >= 10:
        return f"{ratio:.0f}x"
    if ratio >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x (1/{1 / ratio:.0f})" if ratio > 0 else "0x"


def _target(pair: dict[str, RunSummary]) -> float | None:
    finals = [s.final_accuracy for s in pair.values() if s.final_accuracy is not None]
    return min(finals) if finals else None


def markdown_table(summaries: Sequence[RunSummary]) -> str:
    """One row per algorithm and setting, then the FedAvg / FedGKT ratios per setting."""
    header = (
        "| setting | algorithm | edge model | final acc. (%) | best acc. (%) (round) "
        "| edge params | edge train MFLOPs / sample | up MB / client / round "
        "| down MB / client / round | MB / client, whole run | MB / client to common target "
        "| edge TFLOPs to final acc. | edge TFLOPs to common target | s / round |"
    )
    lines = [header, "|" + "---|" * 14]
    by_setting: dict[str, dict[str, RunSummary]] = {}
    for s in summaries:
        by_setting.setdefault(s.setting, {})[s.algorithm] = s
    for setting, pair in by_setting.items():
        target = _target(pair)
        for algorithm in sorted(pair, key=lambda a: ALGORITHMS.index(a) if a in ALGORITHMS else 9):
            s = pair[algorithm]
            best = f"{_pct(s.best_accuracy)} ({s.best_round})" if s.best_round else "n/a"
            lines.append(
                f"| {setting} | {LABELS.get(s.algorithm, s.algorithm)} | {s.edge_model} "
                f"| {_pct(s.final_accuracy)} | {best} | {s.edge_params:,} "
                f"| {s.edge_train_flops_per_sample / 1e6:.1f} | {_mb(s.mean_up)} "
                f"| {_mb(s.mean_down)} | {_mb(s.cumulative_bytes[-1] if s.rounds else None)} "
                f"| {_mb(s.bytes_to_reach(target)) if target is not None else 'n/a'} "
                f"| {_flops(s.edge_flops_to_reach(s.final_accuracy))} "
                f"| {_flops(s.edge_flops_to_reach(target))} | {s.seconds_per_round:.1f} |"
            )
    lines.append("")
    for setting, pair in by_setting.items():
        if not {"fedgkt", "fedavg"} <= set(pair):
            continue
        gkt, avg = pair["fedgkt"], pair["fedavg"]
        target = _target(pair)
        gap = (
            "n/a"
            if gkt.final_accuracy is None or avg.final_accuracy is None
            else f"{100 * (gkt.final_accuracy - avg.final_accuracy):+.2f} points"
        )
        lines.append(
            f"- **{setting}**: FedAvg / FedGKT edge params "
            f"{_ratio(avg.edge_params, gkt.edge_params)}, edge training FLOPs per sample "
            f"{_ratio(avg.edge_train_flops_per_sample, gkt.edge_train_flops_per_sample)}, "
            f"edge FLOPs to the common target ({_pct(target)} %) "
            f"{_ratio(avg.edge_flops_to_reach(target), gkt.edge_flops_to_reach(target))}; "
            f"bytes per client per round up {_ratio(gkt.mean_up, avg.mean_up)} and down "
            f"{_ratio(gkt.mean_down, avg.mean_down)}, over the whole run "
            f"{_ratio(gkt.cumulative_bytes[-1], avg.cumulative_bytes[-1])} and until the "
            f"common target {_ratio(gkt.bytes_to_reach(target), avg.bytes_to_reach(target))} "
            "(FedGKT / FedAvg); "
            f"final accuracy FedGKT - FedAvg {gap}."
        )
    return "\n".join(lines) + "\n"


DEFINITIONS = """\
How the figures are obtained:

- *acc.*: test accuracy over all nodes' test splits (FedGKT: the server model on the
  edge features; FedAvg: the global model), pooled over samples; *final*: last round.
- *edge params*, *edge train MFLOPs / sample*: the model each node trains (FedGKT:
  ResNet-8; FedAvg: the full ResNet), counted with `torch.utils.flop_counter`
  (forward + backward of one sample; a multiply-add is 2 FLOPs).
- *up / down MB / client / round*: bytes of the ArrayRecords of every message of the
  round (training and evaluation), as Flower counts them (`ArrayRecord.count_bytes`),
  averaged over clients and rounds. FedGKT: up = training-split features, logits,
  labels and ids plus test-split features for evaluation; down = the node's server
  logits (none in round 1). FedAvg: down = the global model twice (training and
  evaluation), up = the trained model.
- *MB / client, whole run*: up and down bytes per client summed over all rounds;
  *to common target*: summed until the run first reached the lower of the two
  final accuracies of the setting (`bytes.png` plots accuracy against them).
- *edge TFLOPs to final acc.*: edge FLOPs of all nodes summed over the rounds until the
  run first reached its final accuracy; *to common target*: until it first reached
  the lower of the two final accuracies of the setting. Per round, FedGKT's edge
  spends epochs x training samples x training FLOPs of ResNet-8 plus one forward
  pass over the training split (features) and the test split; FedAvg's spends
  epochs x training samples x training FLOPs of the full ResNet plus one forward
  pass over the test split (evaluation). Server FLOPs are not edge FLOPs.
- *s / round*: mean wall time of a round as the ServerApp measured it (the runs go one
  after another, never side by side).
"""


# -- plots -------------------------------------------------------------------------


def plot_setting(pair: dict[str, RunSummary], out_dir: Path, title: str) -> list[Path]:
    """``accuracy.png``, ``bytes.png`` and ``edge_compute.png`` of one setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = [pair[a] for a in ALGORITHMS if a in pair]
    paths = []

    # accuracy per round
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in ordered:
        label = f"{LABELS[s.algorithm]}: " + (
            f"server {s.server_model} on edge features" if s.server_model else s.edge_model
        )
        ax.plot(s.rounds, _percent(s.accuracy), "o-", color=COLOURS[s.algorithm], label=label)
        if s.algorithm == "fedgkt":
            ax.plot(
                s.rounds,
                _percent(s.edge_accuracy),
                "s--",
                color=COLOURS[s.algorithm],
                alpha=0.6,
                label=f"FedGKT: edge {s.edge_model} alone",
            )
    ax.set(
        title=f"Test accuracy per round\n{title}",
        xlabel="round",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
    )
    ax.set_xticks(ordered[0].rounds if ordered else [])
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9)
    paths.append(_save(fig, out_dir / "accuracy.png"))

    # bytes per client per round, and accuracy against cumulative bytes
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for s in ordered:
        axes[2].plot(
            [b / MB for b in s.cumulative_bytes],
            _percent(s.accuracy),
            "o-",
            color=COLOURS[s.algorithm],
            label=LABELS[s.algorithm],
        )
    axes[2].set(
        title="Accuracy against cumulative bytes",
        xlabel="MB per client, up + down, since round 1 (log scale)",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
    )
    axes[2].set_xscale("log")
    axes[2].grid(alpha=0.3, which="both")
    axes[2].legend()
    for ax, key, name in (
        (axes[0], "up_per_client", "upload (node to server)"),
        (axes[1], "down_per_client", "download (server to node)"),
    ):
        zeros = []
        for s in ordered:
            values = [v / MB if v > 0 else math.nan for v in getattr(s, key)]
            ax.plot(s.rounds, values, "o-", color=COLOURS[s.algorithm], label=LABELS[s.algorithm])
            empty = [str(r) for r, v in zip(s.rounds, getattr(s, key), strict=True) if v <= 0]
            if empty:
                zeros.append(f"{LABELS[s.algorithm]}: 0 B in round {', '.join(empty)}")
        if zeros:
            ax.text(
                0.03,
                0.5,
                "\n".join(zeros),
                transform=ax.transAxes,
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"},
            )
        ax.set_yscale("log")
        ax.set(title=name, xlabel="round", ylabel="MB per client (log scale)")
        ax.set_xticks(ordered[0].rounds if ordered else [])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"Bytes on the wire per client per round (training + evaluation)\n{title}")
    paths.append(_save(fig, out_dir / "bytes.png"))

    # edge compute
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.4
    for i, s in enumerate(ordered):
        offset = (i - (len(ordered) - 1) / 2) * width
        axes[0].bar(
            [r + offset for r in s.rounds],
            [f / 1e12 for f in s.edge_flops],
            width=width,
            color=COLOURS[s.algorithm],
            label=f"{LABELS[s.algorithm]} ({s.edge_model})",
        )
        cumulative = [sum(s.edge_flops[: k + 1]) / 1e12 for k in range(len(s.edge_flops))]
        axes[1].plot(
            cumulative,
            _percent(s.accuracy),
            "o-",
            color=COLOURS[s.algorithm],
            label=f"{LABELS[s.algorithm]} ({s.edge_model})",
        )
    axes[0].set(
        title="Edge compute per round (all nodes)",
        xlabel="round",
        ylabel="edge TFLOPs per round",
    )
    axes[0].set_xticks(ordered[0].rounds if ordered else [])
    axes[1].set(
        title="Accuracy against cumulative edge compute",
        xlabel="cumulative edge TFLOPs (all nodes, log scale)",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
    )
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axes[1].xaxis.set_minor_formatter(NullFormatter())
    top = max((f for s in ordered for f in s.edge_flops), default=0.0) / 1e12
    if top > 0:
        axes[0].set_ylim(0, 1.35 * top)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Edge compute (training + inference FLOPs on the nodes)\n{title}")
    paths.append(_save(fig, out_dir / "edge_compute.png"))
    return paths


def _percent(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else 100 * v for v in values]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- report ------------------------------------------------------------------------


def describe(settings: Settings, partitioner: str) -> str:
    part = (
        f"Dirichlet alpha = {settings.dirichlet_alpha:g}"
        if partitioner == "dirichlet"
        else partitioner.upper()
        if partitioner == "iid"
        else partitioner
    )
    return (
        f"{settings.dataset}, {part}, {settings.nodes} nodes, {settings.rounds} rounds, "
        f"{settings.client_epochs} client epoch(s), seed {settings.seed}"
    )


def write_report(
    settings: Settings,
    output_dir: Path,
    durations: dict[str, float] | None = None,
    code: dict[str, Any] | None = None,
) -> list[RunSummary]:
    """Read every setting's two ``results.json``; write ``comparison.md``,
    ``summary.json`` and each setting's plots. Returns the summaries."""
    durations = durations or {}
    summaries: list[RunSummary] = []
    previous: dict[str, Any] = {}
    try:
        previous = json.loads((output_dir / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    sections = []
    for partitioner in settings.partitioners:
        name = setting_name(partitioner, settings.dirichlet_alpha)
        pair = {}
        for algorithm in settings.algorithms:
            path = output_dir / name / algorithm / "results.json"
            if not path.is_file():
                raise FileNotFoundError(f"no results for {name}/{algorithm}: {path}")
            summary = summarise(json.loads(path.read_text()), name)
            summary.run_seconds = durations.get(f"{name}/{algorithm}")
            pair[algorithm] = summary
        summaries.extend(pair.values())
        plots = plot_setting(pair, output_dir / name, describe(settings, partitioner))
        sections.append(
            f"### {name}: {describe(settings, partitioner)}\n\n"
            + "\n".join(f"![{p.stem}]({p.relative_to(output_dir)})" for p in plots)
            + "\n"
        )
    timing = ""
    if durations:
        timing = (
            "Wall time of each `flwr run` (start-up included): "
            + ", ".join(f"{key} {value:.0f} s" for key, value in durations.items())
            + f"; total {sum(durations.values()) / 60:.1f} min.\n\n"
        )
    text = (
        "# FedGKT vs FedAvg\n\n"
        f"Shared settings: data set `{settings.dataset}`, {settings.nodes} nodes, "
        f"{settings.rounds} rounds, {settings.client_epochs} client epoch(s) per round, "
        f"seed {settings.seed}, FedGKT server model `{settings.server_model}`, FedAvg "
        f"model `{FULL_MODEL[settings.server_model]}`. Extra run config of both: "
        f"`{settings.shared_config or '(none)'}`; FedGKT extra run config: "
        f"`{settings.fedgkt_config or '(defaults)'}`; FedAvg extra run config: "
        f"`{settings.fedavg_config or '(defaults)'}`.\n\n"
        + markdown_table(summaries)
        + "\n"
        + timing
        + DEFINITIONS
        + "\n## Plots\n\n"
        + "\n".join(sections)
    )
    (output_dir / "comparison.md").write_text(text)
    write_json_atomic(
        output_dir / "summary.json",
        {
            "settings": asdict(settings),
            "durations_seconds": durations,
            "code": code or previous.get("code", {}),
            "runs": [
                {
                    **asdict(s),
                    "mean_up_bytes_per_client_round": s.mean_up,
                    "mean_down_bytes_per_client_round": s.mean_down,
                    "total_edge_flops": s.total_edge_flops,
                    "edge_flops_to_final_accuracy": s.edge_flops_to_reach(s.final_accuracy),
                    "seconds_per_round": s.seconds_per_round,
                }
                for s in summaries
            ],
        },
    )
    return summaries


def code_version(repo: Path) -> dict[str, Any]:
    """Commit of ``repo`` and whether its tracked files had local changes."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"commit": commit, "local_changes": bool(git("status", "--porcelain", "-uno"))}


def previous_durations(output_dir: Path) -> dict[str, float]:
    """The run wall times an earlier comparison recorded in ``summary.json``."""
    try:
        recorded = json.loads((output_dir / "summary.json").read_text())["durations_seconds"]
        return {str(k): float(v) for k, v in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


# -- command line ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python baselines/compare.py",
        description=(
            "Run FedGKT (flwr run <repo>) and the FedAvg baseline (flwr run "
            "<repo>/baselines/fedavg) with one shared configuration on Flower's "
            "simulation engine, then write both results.json, a Markdown table and "
            "PNG plots into one folder. Each setting (partitioner) runs both algorithms."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=Path("comparison"))
    parser.add_argument("--dataset", default="digits", help="data set of both runs")
    parser.add_argument(
        "--partitioner",
        nargs="+",
        default=["iid", "dirichlet"],
        help="one setting per partitioner (iid, dirichlet, ...)",
    )
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5)
    parser.add_argument("--nodes", type=int, default=3, help="simulated SuperNodes")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--client-epochs", type=int, default=1)
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[42],
        help="one comparison per seed (several: each in <output-dir>/seed-<seed>, and "
        "seeds.md with the mean and spread over the seeds)",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        choices=ALGORITHMS,
        default=list(ALGORITHMS),
        help="the algorithms to run (FedGKT alone, e.g., to try a FedGKT setting)",
    )
    parser.add_argument(
        "--server-model",
        choices=sorted(FULL_MODEL),
        default="resnet55",
        help="FedGKT's server model; FedAvg trains the matching full model",
    )
    parser.add_argument(
        "--shared-config",
        default="",
        help="extra --run-config for both runs, e.g. \"batch-size=64 data-dir='/data'\"",
    )
    parser.add_argument(
        "--fedgkt-config", default="", help='extra --run-config for FedGKT, e.g. "server-epochs=2"'
    )
    parser.add_argument(
        "--fedavg-config", default="", help='extra --run-config for FedAvg, e.g. "client-lr=0.01"'
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds allowed per flwr run"
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=REPO,
        help="checkout of flwr-fedgkt holding both Flower Apps",
    )
    parser.add_argument(
        "--flower-home",
        type=Path,
        default=None,
        help="folder for the runs' private FLWR_HOME (default: a temporary one, removed after)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="do not run; rebuild table and plots from the results in --output-dir",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1 or args.client_epochs < 0:
        parser.error("--nodes and --rounds must be at least 1, --client-epochs at least 0")
    return args


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so a terminated comparison still stops the
    Flower processes it started (their clean-up runs in ``finally`` blocks)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def compare_seed(args: argparse.Namespace, seed: int, output_dir: Path) -> list[RunSummary]:
    """One comparison (every setting, every algorithm) with ``seed`` into
    ``output_dir``; its summaries."""
    settings = Settings(
        dataset=args.dataset,
        partitioners=tuple(args.partitioner),
        dirichlet_alpha=args.dirichlet_alpha,
        nodes=args.nodes,
        rounds=args.rounds,
        client_epochs=args.client_epochs,
        seed=seed,
        server_model=args.server_model,
        shared_config=args.shared_config,
        fedgkt_config=args.fedgkt_config,
        fedavg_config=args.fedavg_config,
        algorithms=tuple(a for a in ALGORITHMS if a in args.algorithms),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    durations: dict[str, float] = {}
    if args.report_only:
        durations = previous_durations(output_dir)
    else:
        durations = run_all(
            settings,
            output_dir,
            args.repo.resolve(),
            args.timeout,
            args.quiet,
            None if args.flower_home is None else args.flower_home.resolve(),
        )
    code = None if args.report_only else code_version(args.repo.resolve())
    return write_report(settings, output_dir, durations, code)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = _mean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seeds_report(per_seed: dict[int, list[RunSummary]]) -> tuple[str, list[dict[str, Any]]]:
    """The mean and spread over seeds, per setting and algorithm: final accuracy,
    bytes per client over the whole run, and until the seed's common target (the
    lower of the two final accuracies of that seed and setting)."""
    rows: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for summaries in per_seed.values():
        by_setting: dict[str, dict[str, RunSummary]] = {}
        for summary in summaries:
            by_setting.setdefault(summary.setting, {})[summary.algorithm] = summary
        for setting, pair in by_setting.items():
            target = _target(pair) if len(pair) > 1 else None
            for algorithm, summary in pair.items():
                row = rows.setdefault(
                    (setting, algorithm), {"final": [], "run_bytes": [], "to_target": []}
                )
                row["final"].append(summary.final_accuracy)
                row["run_bytes"].append(summary.cumulative_bytes[-1])
                row["to_target"].append(summary.bytes_to_reach(target))
    seeds = ", ".join(str(seed) for seed in per_seed)
    lines = [
        f"Over seeds {seeds}: mean (sample standard deviation).",
        "",
        "| setting | algorithm | final acc. (%) | per seed (%) | MB / client, whole run "
        "| MB / client to common target |",
        "|---|---|---|---|---|---|",
    ]
    figures = []
    for (setting, algorithm), row in rows.items():
        finals = [100 * a for a in row["final"] if a is not None]
        mean, sd = _mean_sd(finals)
        run_mb = _mean_sd([b / MB for b in row["run_bytes"]])
        reached = [b / MB for b in row["to_target"] if b is not None]
        target = (
            f"{_mean_sd(reached)[0]:.2f} ({_mean_sd(reached)[1]:.2f})"
            + (
                f", reached in {len(reached)} of {len(row['to_target'])}"
                if len(reached) < len(row["to_target"])
                else ""
            )
            if reached
            else "n/a"
        )
        lines.append(
            f"| {setting} | {LABELS[algorithm]} | {mean:.2f} ({sd:.2f}) "
            f"| {', '.join(f'{f:.2f}' for f in finals)} | {run_mb[0]:.2f} ({run_mb[1]:.2f}) "
            f"| {target} |"
        )
        figures.append(
            {
                "setting": setting,
                "algorithm": algorithm,
                "final_accuracy": row["final"],
                "bytes_per_client_whole_run": row["run_bytes"],
                "bytes_per_client_to_common_target": row["to_target"],
            }
        )
    return "\n".join(lines) + "\n", figures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _exit_on_sigterm()
    output_dir = args.output_dir.resolve()
    seeds = list(dict.fromkeys(args.seed))
    per_seed: dict[int, list[RunSummary]] = {}
    try:
        for seed in seeds:
            folder = output_dir if len(seeds) == 1 else output_dir / f"seed-{seed}"
            per_seed[seed] = compare_seed(args, seed, folder)
            print(markdown_table(per_seed[seed]))
            print(f"Report: {folder / 'comparison.md'}")
    except (RuntimeError, FileNotFoundError, TimeoutError) as err:
        print(f"comparison failed: {err}", file=sys.stderr)
        return 1
    if len(seeds) > 1:
        text, figures = seeds_report(per_seed)
        (output_dir / "seeds.md").write_text(
            "# FedGKT vs FedAvg over seeds\n\n" + text + "\n" + DEFINITIONS
        )
        write_json_atomic(output_dir / "seeds.json", {"seeds": seeds, "runs": figures})
        print(text)
        print(f"Report: {output_dir / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
