"""Flower's PyTorch quickstart as FedAvg and as FedGKT, side by side, in one process.

    python benchmarks/own_app.py [--rounds 10] [--seeds 3] [--nodes 4]
        [--configs fedavg fedgkt-shared fedgkt-per-node] [--report 3 10]
        [--client-lr 0.1]
        [--per-node-client-lr 0.01]
        [--run-config "local-epochs=2 batch-size=64"]

Runs the apps' own ServerApp and ClientApp functions, those of
``examples/quickstart-pytorch-fedavg`` (``pytorch_fedavg``) and
``examples/quickstart-pytorch-fedgkt`` (``pytorch_fedgkt``), in this process: a
tiny Grid hands each Message straight to the ClientApp's handler for its type,
one Context (with its own state) per node, no Flower processes and no transport.
Every run has the same nodes (partition ``i`` of ``--nodes``), the same data (the
apps' ``digits`` stand-in for CIFAR-10) and the same server-held test set (20 % of
the digits, never on a node). Configurations:

- ``fedavg``: the FedAvg twin's ``main``, Flower's quickstart: FedAvg on Net,
  SGD at its ``learning-rate``; ``global_evaluate`` scores the averaged Net.
- ``fedgkt-shared``: the FedGKT app's ``main`` (``shared-extractor = true``):
  every node keeps the same frozen extractor (Net up to ``conv2``);
  ``global_evaluate`` scores the server's whole Net (that extractor, then the
  trained server part).
- ``fedgkt-per-node``: the FedGKT app with ``shared-extractor = false``: each
  node trains its own extractor; the centralized score is node 0's extractor
  (its newest state) followed by the server part.

Each run's per-round centralized accuracy is read from the ``results.json`` the
app writes. Prints, per configuration, the centralized accuracy at the report
rounds and the wall seconds of a run, as the mean and the standard deviation
over the seeds (``--seeds N``: 42, 43, ...), and each seed's final accuracy.
``--client-lr`` sets the FedGKT app's ``learning-rate`` (the app's default
otherwise; FedAvg keeps its own ``learning-rate``; the server part trains with
``flwr_fedgkt``'s defaults);
``--per-node-client-lr`` is ``learning-rate`` of ``fedgkt-per-node`` (0.01: at
the quickstart's 0.1, training a whole extractor with distillation diverges).
``--run-config`` sets any key of either app's run config (a key that an app
does not have is ignored for that app). Runs alone, with two torch threads.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity

REPO = Path(__file__).resolve().parents[1]
FEDAVG_APP = REPO / "examples" / "quickstart-pytorch-fedavg"
FEDGKT_APP = REPO / "examples" / "quickstart-pytorch-fedgkt"
CONFIGS = ("fedavg", "fedgkt-shared", "fedgkt-per-node")
FIRST_SEED = 42

Handler = Callable[[Message, Context], Message]


class InProcessGrid:
    """A Grid without transport: each Message goes straight to its node's
    ClientApp handler for the message's type, with that node's Context; a handler
    that raises gives an error reply, as Flower reports a ClientApp exception."""

    def __init__(
        self, handlers: dict[str, Handler], num_nodes: int, run_config: dict[str, Any]
    ) -> None:
        self.handlers = handlers  # by message type: train, evaluate (and query)
        self.contexts = {
            10 + i: Context(
                run_id=1,
                node_id=10 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            handler = self.handlers[msg.metadata.message_type]
            try:
                replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # what Flower does with a ClientApp exception
                reason = f"{type(err).__name__}: {err}"
                replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
        return replies

    def context_of(self, partition_id: int) -> Context:
        return next(
            c for c in self.contexts.values() if c.node_config["partition-id"] == partition_id
        )


def app_modules(app: Path, package: str) -> tuple[ModuleType, ModuleType]:
    """The app's ``server_app`` and ``client_app`` modules (its folder on sys.path)."""
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    server = importlib.import_module(f"{package}.server_app")
    client = importlib.import_module(f"{package}.client_app")
    return server, client


def warm_up(app: Path, package: str, nodes: int, dataset: str) -> None:
    """Import the app and build its data (the digits, the nodes' partitions, the
    server's test set), so that no run's seconds include these one-off costs."""
    app_modules(app, package)
    task = importlib.import_module(f"{package}.task")
    for partition_id in range(nodes):
        task.load_partition(partition_id, nodes, dataset)
    next(iter(task.load_centralized_dataset(dataset)))


def app_config(app: Path) -> dict[str, Any]:
    """The app's run config: ``[tool.flwr.app.config]`` of its pyproject.toml."""
    with open(app / "pyproject.toml", "rb") as file:
        return dict(tomllib.load(file)["tool"]["flwr"]["app"]["config"])


@dataclass
class Run:
    accuracy: dict[int, float | None]  # centralized accuracy by round
    seconds: float


def node_zero_evaluate(
    grid: InProcessGrid, client: ModuleType, pair: ModuleType, task: ModuleType, dataset: str
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn`` for per-node extractors: node 0's extractor (its newest
    state), then the server part (``arrays``), on the server-held test set."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        context = grid.context_of(0)
        edge = client.fedgkt_client(context).node(context).trainer().model
        extractor = copy.deepcopy(edge.extractor).float()
        model = pair.deployable_model(pair.net_pair(0))
        state = {f"extractor.{k}": v for k, v in extractor.state_dict().items()}
        state.update({f"server.{k}": v for k, v in arrays.to_torch_state_dict().items()})
        model.load_state_dict(state)
        loader = task.load_centralized_dataset(dataset)
        loss, accuracy = task.test(model, loader, torch.device("cpu"))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    return evaluate


def run_once(config: str, run_config: dict[str, Any], nodes: int, workdir: Path) -> Run:
    """One run of ``config`` with ``run_config``; its accuracy by round from the
    app's results.json."""
    output_dir = workdir / f"{config}-{run_config['seed']}"
    run_config = {**run_config, "output-dir": str(output_dir)}
    torch.manual_seed(int(run_config["seed"]))  # FedAvg's shuffling uses the global RNG
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the apps' prints
        if config == "fedavg":
            server, client = app_modules(FEDAVG_APP, "pytorch_fedavg")
            handlers = {MessageType.TRAIN: client.train, MessageType.EVALUATE: client.evaluate}
            grid = InProcessGrid(handlers, nodes, run_config)
            server.main(grid, Context(0, 0, {}, RecordDict(), run_config))
        else:
            server, client = app_modules(FEDGKT_APP, "pytorch_fedgkt")
            handlers = {
                MessageType.TRAIN: client.train,
                MessageType.EVALUATE: client.evaluate,
                MessageType.QUERY: client.query,
            }
            grid = InProcessGrid(handlers, nodes, run_config)
            evaluate_fn = None  # the app's global_evaluate
            if not run_config["shared-extractor"]:
                pair = importlib.import_module("pytorch_fedgkt.pair")
                task = importlib.import_module("pytorch_fedgkt.task")
                dataset = str(run_config["dataset"])
                evaluate_fn = node_zero_evaluate(grid, client, pair, task, dataset)
            server.run(grid, run_config, evaluate_fn=evaluate_fn)
    seconds = time.perf_counter() - started
    results = json.loads((output_dir / "results.json").read_text())
    accuracy = {r["round"]: r["centralized_accuracy"] for r in results["rounds"]}
    return Run(accuracy, seconds)


def run_configs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The run config of each configuration: the app's own, the knobs, the rounds."""
    overrides: dict[str, Any] = {}
    if args.run_config:
        overrides.update(parse_config_args([args.run_config]))
    fedgkt = app_config(FEDGKT_APP)
    knobs = {
        "learning-rate": args.client_lr,
    }
    fedgkt.update({k: v for k, v in knobs.items() if v is not None})
    configs = {
        "fedavg": app_config(FEDAVG_APP),
        "fedgkt-shared": {**fedgkt, "shared-extractor": True},
        "fedgkt-per-node": {
            **fedgkt,
            "shared-extractor": False,
            "learning-rate": args.per_node_client_lr,
        },
    }
    for config in configs.values():
        config.update({k: v for k, v in overrides.items() if k in config})
        config["num-server-rounds"] = args.rounds
    return configs


def mean_sd(values: list[float], digits: int = 3) -> str:
    """``mean ± standard deviation`` (± 0 for one value)."""
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="runs per configuration")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--report", type=int, nargs="+", default=[3, 10], help="rounds to report")
    parser.add_argument(
        "--client-lr", type=float, help="fedgkt-shared: learning-rate (edge; the app's: 0.1)"
    )
    parser.add_argument(
        "--per-node-client-lr",
        type=float,
        default=0.01,
        help="fedgkt-per-node: learning-rate (edge); at 0.1 its training diverges",
    )
    parser.add_argument(
        "--run-config", default="", help='any run-config keys of the apps, e.g. "local-epochs=2"'
    )
    parser.add_argument("--verbose", action="store_true", help="Flower's log lines too")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (the strategies' minimum)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(2)
    # the identity a ServerApp process has (Messages are stamped with it)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    configs = run_configs(args)
    report = sorted({r for r in args.report if r <= args.rounds} | {args.rounds})
    seeds = [FIRST_SEED + i for i in range(args.seeds)]

    dataset = configs["fedavg"]["dataset"]
    print(
        f"own_app: {args.nodes} nodes, {args.rounds} rounds, seeds {seeds}, "
        f"dataset {dataset!r}; torch threads 2"
    )
    shown = ("learning-rate", "local-epochs")
    for config in args.configs:
        settings = ", ".join(f"{k}={configs[config][k]}" for k in shown if k in configs[config])
        print(f"  {config}: {settings}")
    apps = {"fedavg": (FEDAVG_APP, "pytorch_fedavg"), "fedgkt": (FEDGKT_APP, "pytorch_fedgkt")}
    for key in {"fedavg" if c == "fedavg" else "fedgkt" for c in args.configs}:
        warm_up(*apps[key], args.nodes, str(dataset))
    rows: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="own_app-") as tmp:
        for config in args.configs:
            rows[config] = []
            for seed in seeds:
                run_config = {**configs[config], "seed": seed}
                run = run_once(config, run_config, args.nodes, Path(tmp))
                rows[config].append(run)
                last = run.accuracy.get(args.rounds)
                last_text = "-" if last is None else f"{last:.3f}"
                print(
                    f"  {config} seed {seed}: accuracy at round {args.rounds} {last_text}, "
                    f"{run.seconds:.1f} s",
                    flush=True,
                )

    print()
    print("centralized accuracy on the server-held test set: mean ± sd over seeds")
    header = f"{'configuration':<17}" + "".join(f"{f'round {r}':>16}" for r in report)
    print(header + f"{'seconds/run':>16}")
    for config, runs in rows.items():
        cells = []
        for r in report:
            values = [run.accuracy.get(r) for run in runs]
            cells.append(mean_sd([v for v in values if v is not None]))
        seconds = mean_sd([run.seconds for run in runs], digits=1)
        print(f"{config:<17}" + "".join(f"{c:>16}" for c in cells) + f"{seconds:>16}")


if __name__ == "__main__":
    main()
