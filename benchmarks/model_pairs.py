"""FedGKT at the package's defaults against FedAvg, on three model pairs, in one process.

    python benchmarks/model_pairs.py [--pairs net mlp resnet] [--rounds 10]
        [--seeds 3] [--nodes 4] [--report 3 10] [--threads 2]
        [--configs fedavg fedgkt fedgkt-sgd]

Same nodes (partition ``i`` of ``--nodes``), data (the quickstart apps' ``digits``
stand-in for CIFAR-10: 3x32x32 images, IID partitions split 80/20) and server-held
test set (20 % of the digits) in every run; rounds run in Flower's own
``Strategy.start`` loop on ``own_app.py``'s in-process Grid. Pairs (``--pairs``):

- ``net``: Flower quickstart's ``Net`` cut after ``conv2``
  (``pytorch_fedgkt.pair.net_pair``); FedAvg trains the whole ``Net``.
- ``mlp``: an MLP on the flattened image (3072-256-128-10) cut after its first
  hidden ReLU by ``cut_model`` (edge head: one linear layer); FedAvg: the MLP.
- ``resnet``: the paper's pair, ResNet-8 edge (its ``stem`` is the extractor) and
  ResNet-55 server; FedAvg trains ResNet-56.

Configurations (``--configs``; ``fedavg`` and ``fedgkt`` by default):

- ``fedavg``: Flower's ``FedAvg``; the nodes train the whole model as the
  quickstart's client (``pytorch_fedavg.task.train``: SGD at 0.1, momentum 0.9,
  1 local epoch, batch 32).
- ``fedavg-adam``: the same with ``baselines/fedavg``'s client recipe (the
  paper pair's FedAvg baseline): a fresh Adam at 3e-3 (weight decay 5e-4) per
  round, decayed to 5 % over the run (cosine).
- ``fedgkt``: ``FedGKT`` at the package's defaults (``flwr_fedgkt.DEFAULTS``;
  today: server Adam at 3e-3, weight decay 5e-4, cosine decay to 5 % over the
  run, 1 server epoch per round, batch 64, T = 3, alpha = 1, int8 features) with
  ``extractor=`` the shared frozen extractor, and ``FedGKTClient`` at its
  defaults (Adam at 1e-3, weight decay 5e-4, 1 epoch, batch 32) with
  ``freeze_extractor=True`` and the run's seed (its shuffling).
- ``fedgkt-sgd``: what the quickstart example uses: nodes and server SGD at 0.1
  with momentum 0.9, 2 server epochs per round; the rest as ``fedgkt``.

The nodes and the server build the pair from the run's seed (one frozen
extractor). ``evaluate_fn`` scores the averaged model (FedAvg) or the deployable
model (FedGKT: extractor, then server part) on the server-held test set every
round. Prints each seed's final accuracy as it goes, the accuracy at the report
rounds and the wall seconds of a run (mean ± sd over the seeds 42, 43, ...) per
pair and configuration, and a markdown table of the same.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn
from torch.utils.data import DataLoader

from flwr_fedgkt import FedGKT, FedGKTClient, cut_model, default_node_key, key_reply, models
from flwr_fedgkt.edge import extractor_of

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # own_app
for app in ("fedavg", "fedgkt"):  # pytorch_fedavg, pytorch_fedgkt
    sys.path.insert(0, str(BENCHMARKS.parent / "examples" / f"quickstart-pytorch-{app}"))

from own_app import FIRST_SEED, Handler, InProcessGrid, mean_sd  # noqa: E402
from pytorch_fedavg import task as fedavg_task  # noqa: E402
from pytorch_fedgkt import task  # noqa: E402
from pytorch_fedgkt.pair import net_pair  # noqa: E402

DATASET = "digits"
INPUT_SHAPE = (3, 32, 32)
PAIRS = ("net", "mlp", "resnet")
CONFIGS = ("fedavg", "fedavg-adam", "fedgkt", "fedgkt-sgd")
ADAM_LR, ADAM_WEIGHT_DECAY = 3e-3, 5e-4  # fedavg-adam: baselines/fedavg's recipe
FEDAVG_LR, FEDAVG_EPOCHS, FEDAVG_BATCH = 0.1, 1, 32  # Flower's quickstart client
SGD_LR = 0.1  # fedgkt-sgd: the quickstart example's rate, on the nodes and the server
CPU = torch.device("cpu")


def sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """fedgkt-sgd's optimizer: SGD at 0.1 with momentum 0.9 (the quickstart's)."""
    return torch.optim.SGD(params, lr=SGD_LR, momentum=0.9)


@dataclass(frozen=True)
class Split:
    """An edge model (``forward(x) -> (logits, features)``), the server model on its
    features and one sample's feature shape."""

    edge: nn.Module
    server: nn.Module
    feature_shape: tuple[int, ...]


@dataclass(frozen=True)
class PairSpec:
    """A model pair: ``split(seed)`` for FedGKT, ``edge(seed)`` (the same edge
    alone) and ``whole(seed)``, the uncut model that FedAvg trains."""

    split: Callable[[int], Split]
    edge: Callable[[int], nn.Module]
    whole: Callable[[int], nn.Module]


def mlp() -> nn.Sequential:
    """The MLP on a flattened 3x32x32 image: 3072-256-128-10 (torch's global RNG)."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(3 * 32 * 32, 256),
            relu1=nn.ReLU(),
            fc2=nn.Linear(256, 128),
            relu2=nn.ReLU(),
            fc3=nn.Linear(128, 10),
        )
    )


def mlp_split(seed: int) -> Split:
    """The MLP from ``seed`` cut after ``relu1``: edge = flatten, fc1, relu1 and
    ``cut_model``'s default head, Linear(256, 10); server = fc2, relu2, fc3."""
    pair = task.seeded(lambda: cut_model(mlp(), "relu1", INPUT_SHAPE), seed)
    return Split(pair.edge, pair.server, pair.feature_shape)


def net_split(seed: int) -> Split:
    """The quickstart's Net cut after ``conv2`` (``pytorch_fedgkt.pair.net_pair``)."""
    pair = net_pair(seed)
    return Split(pair.edge, pair.server, pair.feature_shape)


def resnet_split(seed: int) -> Split:
    """The paper's pair: ResNet-8 (edge) and ResNet-55 (server) from ``seed``."""
    edge = models.seeded_model("resnet8", seed=seed)
    server = models.seeded_model("resnet55", seed=seed)
    return Split(edge, server, models.feature_shape_of("resnet55"))


SPECS = {
    "net": PairSpec(net_split, lambda s: net_pair(s).edge, lambda s: task.seeded(task.Net, s)),
    "mlp": PairSpec(mlp_split, lambda s: mlp_split(s).edge, lambda s: task.seeded(mlp, s)),
    "resnet": PairSpec(
        resnet_split,
        lambda s: models.seeded_model("resnet8", seed=s),
        lambda s: models.seeded_model("resnet56", seed=s),
    ),
}


@dataclass
class Run:
    """One run's centralized accuracy by round (0: before round 1), its seconds."""

    accuracy: dict[int, float]
    seconds: float


def central_evaluate(
    template: nn.Module, accuracy: dict[int, float]
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """``evaluate_fn``: ``template`` with the round's arrays, in eval mode, on the
    server-held test set; each round's accuracy goes into ``accuracy``."""
    loader = task.load_centralized_dataset(DATASET)
    template.eval()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        template.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = task.test(template, loader, CPU)
        accuracy[server_round] = acc
        return MetricRecord({"accuracy": acc, "loss": loss})

    return evaluate


def adam_train(model: nn.Module, data: DataLoader, lr: float) -> float:
    """One epoch of ``baselines/fedavg``'s client: a fresh Adam (weight decay
    5e-4) at ``lr``; the mean training loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=ADAM_WEIGHT_DECAY)
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, batches = 0.0, 0
    for batch in data:
        optimizer.zero_grad()
        loss = criterion(model(batch["img"]), batch["label"])
        loss.backward()
        optimizer.step()
        total, batches = total + float(loss), batches + 1
    return total / max(batches, 1)


def cosine_lr(lr: float, server_round: int, rounds: int) -> float:
    """``baselines/fedavg``'s schedule: ``lr`` decayed to 5 % over the run (cosine)."""
    progress = (server_round - 1) / max(rounds - 1, 1)
    return lr * (0.05 + 0.95 * (1.0 + math.cos(math.pi * progress)) / 2.0)


def fedavg_handlers(
    spec: PairSpec, seed: int, nodes: int, adam_rounds: int | None = None
) -> dict[str, Handler]:
    """Flower's quickstart ClientApp for the uncut model: ``train`` (SGD, the
    message's ``lr``; with ``adam_rounds``, ``baselines/fedavg``'s Adam with its
    cosine decay over that many rounds) and ``evaluate`` on the node's split."""

    def loader(context: Context, split: str) -> DataLoader:
        partition = task.load_partition(int(context.node_config["partition-id"]), nodes, DATASET)
        data = partition.with_transform(task.apply_transforms)[split]
        return DataLoader(data, batch_size=FEDAVG_BATCH, shuffle=split == "train")

    def model_of(msg: Message) -> nn.Module:
        model = spec.whole(seed)  # the architecture; its weights are the message's
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        return model

    def train(msg: Message, context: Context) -> Message:
        model, data = model_of(msg), loader(context, "train")
        config = msg.content["config"]
        if adam_rounds is None:
            loss = fedavg_task.train(model, data, FEDAVG_EPOCHS, float(config["lr"]), CPU)
        else:
            lr = cosine_lr(ADAM_LR, int(config["server-round"]), adam_rounds)
            loss = adam_train(model, data, lr)
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(data.dataset)})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    def evaluate(msg: Message, context: Context) -> Message:
        model, data = model_of(msg).eval(), loader(context, "test")
        loss, acc = fedavg_task.test(model, data, CPU)
        metrics = {"eval_loss": loss, "eval_acc": acc, "num-examples": len(data.dataset)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return {MessageType.TRAIN: train, MessageType.EVALUATE: evaluate}


def fedgkt_handlers(spec: PairSpec, seed: int, nodes: int, with_sgd: bool) -> dict[str, Handler]:
    """A ClientApp with ``FedGKTClient`` (one per node, its state in the node's
    Context): the edge from ``seed`` on every node, its extractor frozen; the
    client's own defaults, or (``with_sgd``) SGD at 0.1 with momentum 0.9."""
    clients: dict[int, FedGKTClient] = {}

    def client(context: Context) -> FedGKTClient:
        partition_id = int(context.node_config["partition-id"])
        if partition_id not in clients:
            partition = task.load_partition(partition_id, nodes, DATASET)
            knobs: dict[str, Any] = {"lr": SGD_LR, "optimizer": sgd} if with_sgd else {}
            clients[partition_id] = FedGKTClient(
                lambda: spec.edge(seed),
                partition["train"],
                partition["test"],
                transform=task.pytorch_transforms,
                freeze_extractor=True,
                seed=seed,  # the node's shuffling, as the quickstart's client
                **knobs,
            )
        return clients[partition_id]

    return {
        MessageType.TRAIN: lambda msg, ctx: client(ctx).train(msg, ctx),
        MessageType.EVALUATE: lambda msg, ctx: client(ctx).evaluate(msg, ctx),
        MessageType.QUERY: lambda msg, ctx: key_reply(msg, default_node_key(ctx.node_config)),
    }


def run_once(pair: str, config: str, seed: int, rounds: int, nodes: int) -> Run:
    """One run, timed from building its models to the last evaluation.

    Parameters
    ----------
    pair, config : str
        One of :data:`PAIRS`, one of :data:`CONFIGS`.
    seed : int
        Builds every model of the run; seeds sampling and the nodes' shuffling.
    rounds, nodes : int
        Rounds of the run; nodes of the in-process Grid.

    Returns
    -------
    Run
        The centralized accuracy after every round (0: the starting model).
    """
    spec = SPECS[pair]
    accuracy: dict[int, float] = {}
    torch.manual_seed(seed)  # FedAvg's shuffling draws from the global RNG
    started = time.perf_counter()
    if config in ("fedavg", "fedavg-adam"):
        whole = spec.whole(seed)
        adam_rounds = rounds if config == "fedavg-adam" else None
        grid = InProcessGrid(fedavg_handlers(spec, seed, nodes, adam_rounds), nodes, {})
        FedAvg(fraction_evaluate=1.0).start(
            grid=grid,
            initial_arrays=ArrayRecord(whole.state_dict()),
            train_config=ConfigRecord({"lr": FEDAVG_LR}),
            num_rounds=rounds,
            evaluate_fn=central_evaluate(copy.deepcopy(whole), accuracy),
        )
    else:
        split = spec.split(seed)
        extractor = extractor_of(split.edge)
        with_sgd = config == "fedgkt-sgd"
        knobs: dict[str, Any] = {}  # fedgkt: the package's defaults
        if with_sgd:
            knobs = {"server_lr": SGD_LR, "server_epochs": 2, "optimizer": sgd}
        strategy = FedGKT(
            split.server,
            feature_shape=split.feature_shape,
            extractor=extractor,
            freeze_extractor=True,
            fraction_evaluate=1.0,
            seed=seed,
            **knobs,
        )
        template = models.extractor_and_server(
            copy.deepcopy(extractor), copy.deepcopy(split.server)
        )
        handlers = fedgkt_handlers(spec, seed, nodes, with_sgd)
        strategy.start(
            grid=InProcessGrid(handlers, nodes, {}),
            initial_arrays=ArrayRecord(),
            num_rounds=rounds,
            evaluate_fn=central_evaluate(template, accuracy),
        )
    return Run(accuracy, time.perf_counter() - started)


def describe(pair: str) -> str:
    """Parameter counts of the pair's edge, server and uncut model."""
    split, whole = SPECS[pair].split(0), SPECS[pair].whole(0)
    edge, server = models.count_parameters(split.edge), models.count_parameters(split.server)
    return (
        f"{pair}: edge {edge:,} params, server {server:,}, features {split.feature_shape}; "
        f"FedAvg model {models.count_parameters(whole):,}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["fedavg", "fedgkt"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--report", type=int, nargs="+", default=[3, 10], help="rounds to report")
    parser.add_argument("--seeds", type=int, default=3, help="runs per configuration")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--verbose", action="store_true", help="Flower's log lines too")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2 (the strategies' minimum)")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every pair and configuration over the seeds; print the figures."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # the identity a ServerApp process has (Messages are stamped with it)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    report = sorted({r for r in args.report if r <= args.rounds} | {args.rounds})
    seeds = [FIRST_SEED + i for i in range(args.seeds)]
    print(
        f"model_pairs: {args.nodes} nodes, {args.rounds} rounds, seeds {seeds}, "
        f"dataset {DATASET!r}; torch threads {args.threads}"
    )
    for partition_id in range(args.nodes):  # build the data once, outside every run
        task.load_partition(partition_id, args.nodes, DATASET)
    next(iter(task.load_centralized_dataset(DATASET)))

    rows: list[tuple[str, str, list[str], str]] = []
    for pair in args.pairs:
        print(describe(pair), flush=True)
        for config in args.configs:
            runs = []
            for seed in seeds:
                run = run_once(pair, config, seed, args.rounds, args.nodes)
                runs.append(run)
                last = run.accuracy.get(args.rounds)
                print(
                    f"  {pair} {config} seed {seed}: accuracy at round {args.rounds} "
                    f"{'-' if last is None else f'{last:.3f}'}, {run.seconds:.1f} s",
                    flush=True,
                )
            cells = [mean_sd([x.accuracy[r] for x in runs if r in x.accuracy]) for r in report]
            seconds = mean_sd([x.seconds for x in runs], digits=1)
            rows.append((pair, config, cells, seconds))
            at = ", ".join(f"round {r} {c}" for r, c in zip(report, cells, strict=True))
            print(f"  {pair} {config}: {at}; {seconds} s/run", flush=True)

    print()
    print(
        f"Centralized accuracy on the server-held test set, mean ± sd over {len(seeds)} "
        f"seed(s); {args.nodes} nodes"
    )
    print()
    print(
        "| pair | configuration | " + " | ".join(f"round {r}" for r in report) + " | seconds/run |"
    )
    print("|---|---|" + "---:|" * (len(report) + 1))
    for pair, config, cells, seconds in rows:
        print(f"| {pair} | {config} | " + " | ".join(cells) + f" | {seconds} |")


if __name__ == "__main__":
    main()
