"""How large honest edge features and logits are: the measurement behind the
default ``max-feature-abs`` and ``max-logit-abs`` bounds.

    python benchmarks/feature_range.py [--datasets digits synthetic] [--rounds 4]

For partition 0 (of 3, IID, seed 42) of each data set, trains the ResNet-8 edge
model one epoch per round at the default client learning rate and at 10x it, and
prints, before each round's training, the largest absolute value of the
extracted features and of the edge logits over the partition's training split.
A model of your own has its own range: run its extractor over a few batches the
same way and set ``max-feature-abs`` well above what you see.
"""

from __future__ import annotations

import argparse

import torch

from flwr_fedgkt.data import load_partition
from flwr_fedgkt.edge import EdgeTrainer
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.validation import MAX_LOGIT_ABS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "synthetic"])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    defaults = RunConfig.from_mapping({})
    print(f"bounds: max-feature-abs {defaults.max_feature_abs:g}, max_logit_abs {MAX_LOGIT_ABS:g}")
    print("data set | client lr | max |feature| / max |logit| before rounds 1..n")
    for dataset in args.datasets:
        partition = load_partition(dataset, 0, 3, seed=42)
        for lr in (defaults.client_lr, 10 * defaults.client_lr):
            trainer = EdgeTrainer(partition.num_classes, lr=lr, device="cpu", seed=0)
            seen = []
            for server_round in range(args.rounds):
                extracted = trainer.extract(partition.train)
                seen.append(
                    f"{float(extracted.features.abs().max()):.2f}"
                    f"/{float(extracted.logits.abs().max()):.2f}"
                )
                generator = torch.Generator().manual_seed(server_round)
                trainer.train(partition.train, epochs=1, batch_size=32, generator=generator)
            print(f"{dataset} | {lr:g} | {'  '.join(seen)}", flush=True)


if __name__ == "__main__":
    main()
