"""Bytes per client at the paper's scale, computed from measured sizes.

    python baselines/projection.py [--zstd-ratio 2.13] [--rounds 200]

CIFAR-10 over 8 clients as in the paper: 6,250 training and 1,250 test images per
client, 200 rounds. What each figure rests on:

- *measured here*: the bytes of the full ResNet-56 / ResNet-110 as Flower counts
  them (``ArrayRecord(model.state_dict()).count_bytes()``, buffers included), built
  by this script; the wire layout of a FedGKT upload (int8: 1 byte per feature
  value plus a float32 scale and offset per channel; ids int64, labels int64,
  logits float32); the zstd ratio of int8 edge features (``--zstd-ratio``,
  default: 2.13, ``benchmarks/compression.py`` on digits; natural images may
  compress less: the synthetic set gave about 1.5).
- *computed*: everything per round and per run, from those sizes.

FedAvg (Flower's strategy, as the comparison runs it) sends each client the
global model for training and again for evaluation and gets the trained model
back: three models per round. The reference FedGKT implementation sends float32
features of the client's training split and of the whole 10,000-image test set
every round. This project's modes send the 1,250 test images of the client's own
test split.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from flwr.app import ArrayRecord

from flwr_fedgkt.models import build_model

MB = 1e6
TRAIN, TEST, FULL_TEST = 6_250, 1_250, 10_000
FEATURE_VALUES = 16 * 32 * 32  # ResNet-8's 16 x 32 x 32 feature map
CLASSES = 10
ID, LABEL, LOGITS = 8, 8, 4 * CLASSES  # int64, int64, float32 x classes
INT8_CODE = 2 * 16 * 4  # a float32 scale and offset per channel, per upload


@dataclass(frozen=True)
class Mode:
    name: str
    first: float  # bytes up + down of a round that sends features
    later: float  # bytes of a round after the last feature upload
    uploads: int | None  # rounds that send features (None: every round)

    def cumulative(self, rounds: int) -> float:
        sending = rounds if self.uploads is None else min(self.uploads, rounds)
        return sending * self.first + (rounds - sending) * self.later


def model_bytes(name: str) -> int:
    return ArrayRecord(build_model(name, CLASSES).state_dict()).count_bytes()


def modes(zstd_ratio: float, freeze_rounds: list[int]) -> list[Mode]:
    logits_down = TRAIN * (ID + LOGITS)  # the client's server logits
    ids_logits_up = TRAIN * (ID + LOGITS) + TEST * ID  # unchanged features: ids + logits
    reference = (
        TRAIN * (4 * FEATURE_VALUES + LABEL + LOGITS + ID)
        + FULL_TEST * (4 * FEATURE_VALUES + LABEL + ID)
        + logits_down
    )
    int8_features = (TRAIN + TEST) * FEATURE_VALUES + 2 * INT8_CODE
    rest = TRAIN * (LABEL + LOGITS + ID) + TEST * (LABEL + ID) + logits_down
    int8 = int8_features + rest
    packed = int8_features / zstd_ratio + rest
    later = ids_logits_up + logits_down
    out = [
        Mode("FedGKT reference: float32 features, train + 10,000 test images", reference, 0, None),
        Mode("int8 features, no compression", int8, 0, None),
        Mode(f"int8 + zstd (default; ratio {zstd_ratio:g})", packed, 0, None),
    ]
    for k in freeze_rounds:
        name = f"int8 + zstd, freeze-after = {k}"
        if k == 0:
            name = "int8 + zstd, freeze-extractor (freeze-after = 0)"
        out.append(Mode(name, packed, later, max(k, 1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zstd-ratio", type=float, default=2.13)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--freeze-after", type=int, nargs="+", default=[0, 2, 4])
    args = parser.parse_args()
    fedavg = {name: 3 * model_bytes(name) for name in ("resnet56", "resnet110")}
    print(
        f"CIFAR-10, 8 clients ({TRAIN:,} training / {TEST:,} test images each), "
        f"{args.rounds} rounds; MB per client (up + down)\n"
    )
    print(
        "| algorithm / mode | per round (feature rounds) | per round (later) "
        f"| {args.rounds} rounds | vs FedAvg ResNet-56 | vs FedAvg ResNet-110 |"
    )
    print("|---|---|---|---|---|---|")
    for name, per_round in fedavg.items():
        total = per_round * args.rounds
        print(
            f"| FedAvg {name} (3 x {per_round / 3 / MB:.2f} MB model) | {per_round / MB:.2f} "
            f"| {per_round / MB:.2f} | {total / MB:,.0f} "
            f"| {total / (fedavg['resnet56'] * args.rounds):.2f}x "
            f"| {total / (fedavg['resnet110'] * args.rounds):.2f}x |"
        )
    for mode in modes(args.zstd_ratio, args.freeze_after):
        total = mode.cumulative(args.rounds)
        later = f"{mode.later / MB:.2f}" if mode.uploads is not None else "-"
        print(
            f"| {mode.name} | {mode.first / MB:.2f} | {later} | {total / MB:,.0f} "
            f"| {total / (fedavg['resnet56'] * args.rounds):.2f}x "
            f"| {total / (fedavg['resnet110'] * args.rounds):.2f}x |"
        )
    print(
        "\nA node sends features in every round in which they changed: with "
        "freeze-after = K (K >= 1) in rounds 1..K (round K's upload is already the "
        "frozen extractor's, so round K+1 sends none), with freeze-extractor once."
    )


if __name__ == "__main__":
    main()
