"""What the server learns from a node, per defence, and what each defence costs.

    pip install -e ".[privacy]"   # torchmetrics, for PSNR and SSIM
    python benchmarks/privacy.py [--datasets digits synthetic] [--seeds 42 43 44]
        [--rounds 8] [--settings none noise-1 ...] [--out DIR]

For each data set, setting and seed, FedGKT runs in one process (the same node
and server code the Flower apps run, :func:`flwr_fedgkt.local.local_engine`) on
partitions 0-2 of four: partition 3 never takes part and is the auxiliary data
an honest-but-curious server owns (carved out here only: a run's own partitions
are not changed). After the run:

- **accuracy**: the server model on every node's newest test upload, against
  the true test labels (the benchmark knows them; under label DP the run's own
  record can only estimate this);
- **feature inversion**: a decoder (features to image) trained on the auxiliary
  images, whose features the attacker obtains from node 0's final extractor
  and puts through node 0's defences (clip, noise with its own draws) and the
  wire codec. An honest-but-curious server sees no edge weights, so this
  attacker is stronger than the real one and its PSNR / SSIM (torchmetrics)
  bound what inversion can recover. It reconstructs node 0's training images
  from the features that arrived on the wire; a picture grid per setting
  (originals above, reconstructions below) goes to ``--out``;
- **label leakage**: the fraction of node 0's training labels the server gets
  right from the label field, from its own model's prediction on the uploaded
  features and from the edge logits, the best of the three (and the label
  field alone);
- **epsilon** at delta 1e-5 over the run's feature releases (worst node,
  ``flwr_fedgkt.privacy.ReleaseLedger``), and the bytes uploaded.

Prints one table per data set (mean and sd over the seeds; one test image of
digits is 0.28 points) and writes ``privacy.json`` and the grids to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from flwr_fedgkt.codec import decode_features, encode_features
from flwr_fedgkt.edge import extractor_of
from flwr_fedgkt.local import LocalRun, local_engine
from flwr_fedgkt.privacy import release
from flwr_fedgkt.settings import RunConfig

REPO = Path(__file__).resolve().parents[1]
NODES, AUX = [0, 1, 2], 3  # partitions that take part; the server's auxiliary one
CLIP = 50.0
"""``feature-clip`` of the noise settings: about the median L2 norm of a digits
sample's 16x32x32 stem features at the start of training (43 and 56 on the
ResNet-8 stems of partitions 0 and 1 of four, seed 42). A clipped value is then
about 50 / 128 = 0.4 on average, so noise multipliers of 0.002 to 0.02 put a
standard deviation of 0.1 to 1.0 on every value."""
SETTINGS: dict[str, dict[str, object]] = {
    "none": {},
    "clip": {"feature-clip": CLIP},
    "noise-0.002": {"feature-clip": CLIP, "feature-noise": 0.002},
    "noise-0.005": {"feature-clip": CLIP, "feature-noise": 0.005},
    "noise-0.02": {"feature-clip": CLIP, "feature-noise": 0.02},
    "label-eps-1": {"label-epsilon": 1.0},
    "label-eps-2": {"label-epsilon": 2.0},
    "label-eps-4": {"label-epsilon": 4.0},
    "nopeek-0.5": {"nopeek-weight": 0.5},
    "nopeek-2": {"nopeek-weight": 2.0},
    "cut-1": {"edge-stages": 1},
    "cut-2": {"edge-stages": 2},
    "recommended": {"privacy": "recommended"},
}


def run_config(dataset: str, seed: int, rounds: int, setting: str) -> RunConfig:
    values: dict[str, object] = {
        "dataset": dataset,
        "seed": seed,
        "num-server-rounds": rounds,
        "torch-threads": ARGS.threads,
        **SETTINGS[setting],
    }
    if dataset == "synthetic":
        values["synthetic-samples-per-node"] = 160
    return RunConfig.from_mapping(values)


# -- what the server learns ------------------------------------------------------------
def true_accuracy(run: LocalRun) -> float:
    """The server model on each node's newest test upload, against true labels."""
    correct = total = 0
    for key, partition in zip(map(str, range(len(NODES))), run.partitions, strict=True):
        payload = run.engine.step.test_cache[key][1]
        truth = dict(zip(partition.test.ids.tolist(), partition.test.labels.tolist(), strict=True))
        predicted = run.engine.trainer.predict(decode_features(payload.features)).argmax(1)
        labels = torch.tensor([truth[int(i)] for i in payload.ids])
        correct += int((predicted == labels).sum())
        total += len(labels)
    return correct / total


def label_leakage(run: LocalRun) -> tuple[float, float]:
    """Node 0's training labels the server gets right: the best of the label field,
    its model's prediction on the features and the edge logits; and the field alone."""
    payload = run.engine.store.payload("0")
    train = run.partitions[0].train
    truth = dict(zip(train.ids.tolist(), train.labels.tolist(), strict=True))
    labels = torch.tensor([truth[int(i)] for i in payload.ids])
    field = float((torch.from_numpy(payload.labels) == labels).float().mean())
    predicted = run.engine.trainer.predict(run.engine.store.node_features("0")).argmax(1)
    model = float((predicted == labels).float().mean())
    edge = float((torch.from_numpy(payload.logits).argmax(1) == labels).float().mean())
    return max(field, model, edge), field


class Decoder(nn.Module):
    """Features (C x S x S) back to an image (3 x 32 x 32)."""

    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Upsample(scale_factor=32 // side) if side < 32 else nn.Identity(),
            nn.Conv2d(channels, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 3, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _as_on_the_wire(features: Tensor, dtype: str) -> Tensor:
    return decode_features(encode_features(features, dtype))


def inversion(run: LocalRun, aux: Tensor, config: RunConfig, seed: int, epochs: int):
    """Train the decoder on the auxiliary images, reconstruct node 0's uploaded
    training images; PSNR, SSIM, and (originals, reconstructions) to draw."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    node = run.nodes[0]
    trainer = node.trainer()
    extractor = extractor_of(trainer.model).eval()
    with torch.no_grad():
        clean = torch.cat([extractor(batch) for batch in aux.split(128)]).float()
    labels = torch.zeros(len(aux), dtype=torch.long)  # not used by the features' defences
    features, _ = release(
        clean, labels, node.defences, 10, secret=seed + 10_000, split="aux", release_key=0
    )
    features = _as_on_the_wire(features, config.feature_dtype)
    torch.manual_seed(seed)
    decoder = Decoder(features.shape[1], features.shape[-1])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(aux), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(decoder(features[index]), aux[index])
            loss.backward()
            optimizer.step()
    payload = run.engine.store.payload("0")
    train = run.partitions[0].train
    position = {int(i): n for n, i in enumerate(train.ids.tolist())}
    originals = train.images[[position[int(i)] for i in payload.ids]]
    with torch.no_grad():
        uploaded = run.engine.store.node_features("0").float()
        rebuilt = torch.cat([decoder(batch) for batch in uploaded.split(128)])
    span = float(originals.max() - originals.min())
    psnr = float(peak_signal_noise_ratio(rebuilt, originals, data_range=span))
    ssim = float(structural_similarity_index_measure(rebuilt, originals, data_range=span))
    return psnr, ssim, originals[:8], rebuilt[:8]


def draw(originals: Tensor, rebuilt: Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = float(originals.min()), float(originals.max())

    def show(image: Tensor) -> np.ndarray:
        return ((image.clamp(low, high) - low) / (high - low)).permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(2, len(originals), figsize=(1.2 * len(originals), 2.8))
    for column, (original, guess) in enumerate(zip(originals, rebuilt, strict=True)):
        axes[0][column].imshow(show(original))
        axes[1][column].imshow(show(guess))
        axes[0][column].axis("off")
        axes[1][column].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the table ------------------------------------------------------------------------------
def measure(dataset: str, setting: str, seed: int, rounds: int, epochs: int, out: Path) -> dict:
    config = run_config(dataset, seed, rounds, setting)
    run = local_engine(config, len(NODES) + 1, taking_part=NODES)
    from flwr_fedgkt.node import load_node_partition

    aux_partition = load_node_partition(AUX, len(NODES) + 1, config)
    aux = torch.cat([aux_partition.train.images, aux_partition.test.images])
    psnr, ssim, originals, rebuilt = inversion(run, aux, config, seed, epochs)
    if seed == min(ARGS.seeds):
        draw(originals, rebuilt, out / f"grid-{dataset}-{setting}.png", f"{dataset}: {setting}")
    leak, field = label_leakage(run)
    history = run.engine.history
    privacy = history[-1]["privacy"]
    return {
        "accuracy": true_accuracy(run),
        "record_accuracy": history[-1]["accuracy"],
        "psnr": psnr,
        "ssim": ssim,
        "label_leakage": leak,
        "label_field": field,
        "epsilon": privacy["epsilon"],
        "releases": privacy["releases_max"],
        "mb_up": sum(r["bytes_up"] for r in history) / 1e6,
    }


def _fmt(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    got = [v * scale for v in values if v is not None]
    if not got:
        return "unbounded"
    text = f"{statistics.mean(got):.{digits}f}"
    return text + (f" ± {statistics.stdev(got):.{digits}f}" if len(got) > 1 else "")


def report(results: dict, datasets: list[str], settings: list[str]) -> None:
    for dataset in datasets:
        print(f"\n{dataset} (3 nodes, seeds {ARGS.seeds})")
        print(
            "| setting | accuracy (%) | PSNR (dB) | SSIM | labels leaked (%) | label field (%) "
            "| epsilon (delta 1e-5) | MB up |\n|---|---|---|---|---|---|---|---|"
        )
        for setting in settings:
            runs = [results[k] for k in results if k.startswith(f"{dataset}/{setting}/")]
            if not runs:
                continue
            column = {name: [r[name] for r in runs] for name in runs[0]}
            print(
                f"| {setting} | {_fmt(column['accuracy'], 100)} | {_fmt(column['psnr'], 1, 1)} "
                f"| {_fmt(column['ssim'])} | {_fmt(column['label_leakage'], 100, 1)} "
                f"| {_fmt(column['label_field'], 100, 1)} | {_fmt(column['epsilon'], 1, 3)} "
                f"| {_fmt(column['mb_up'], 1, 1)} |"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", choices=["digits", "synthetic"], default=["digits", "synthetic"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--decoder-epochs", type=int, default=30)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "privacy")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the runs and the attack (0: every core); with 1, one "
        "process per data set can share a 2-core machine (--out to separate folders, "
        "then the folders' privacy.json merged into one for the table)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown --settings {unknown}; known: {sorted(SETTINGS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    global ARGS
    ARGS = parse_args(argv)
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    ARGS.out.mkdir(parents=True, exist_ok=True)
    path = ARGS.out / "privacy.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for dataset in ARGS.datasets:
        for setting in ARGS.settings:
            for seed in ARGS.seeds:
                key = f"{dataset}/{setting}/{seed}"
                if key in results:
                    continue
                print(f"[{key}]", flush=True)
                results[key] = measure(
                    dataset, setting, seed, ARGS.rounds, ARGS.decoder_epochs, ARGS.out
                )
                path.write_text(json.dumps(results, indent=1))
    report(results, ARGS.datasets, ARGS.settings)


ARGS = argparse.Namespace(seeds=[42], threads=0)

if __name__ == "__main__":
    main()
