"""How far apart honest nodes' feature ranges are, against the federation check's
factor (``flwr_fedgkt.validation.federation.FACTOR``, 8).

    python benchmarks/honest_range.py

For each federation: every node's per-channel largest feature (its whole training
split through its extractor, at initialisation), and the largest ratio of one
node's channel maximum to the other nodes' median (with the check's floor), over
nodes and channels. Federations: the paper's ResNet-8 stem on digits and
synthetic (3 nodes, each its own initialisation, or one shared), and the
quickstart Net's and the MLP's extractor on the digits stand-in (4 nodes, one
extractor).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples" / "quickstart-pytorch-fedgkt"))

import model_pairs  # noqa: E402
from pytorch_fedgkt.pair import net_pair  # noqa: E402
from pytorch_fedgkt.task import apply_transforms, load_partition  # noqa: E402

from flwr_fedgkt.codec import FeaturePayload, encode_features  # noqa: E402
from flwr_fedgkt.node import edge_model_factory, load_node_partition  # noqa: E402
from flwr_fedgkt.settings import RunConfig  # noqa: E402
from flwr_fedgkt.validation.federation import RELATIVE_FLOOR, payload_range  # noqa: E402


def largest_ratio(ranges: list[np.ndarray]) -> float:
    """The largest channel ratio of a node to the other nodes' median."""
    ratios = []
    for i, mine in enumerate(ranges):
        reference = np.median(np.stack([r for j, r in enumerate(ranges) if j != i]), axis=0)
        floor = RELATIVE_FLOOR * reference.max()
        ratios.append(float((mine / np.maximum(reference, floor)).max()))
    return max(ratios)


def feature_range(features: torch.Tensor) -> np.ndarray:
    """The per-channel range of these features as the server sees them (int8)."""
    n = len(features)
    payload = FeaturePayload(
        encode_features(features, "int8"),
        np.zeros((n, 10), np.float32),
        np.zeros(n, np.int64),
        np.arange(n),
    )
    return payload_range(payload).features


def resnet8(dataset: str, shared: bool) -> float:
    config = RunConfig.from_mapping({"dataset": dataset, "shared-extractor-init": shared})
    ranges = []
    for partition_id in range(3):
        partition = load_node_partition(partition_id, 3, config)
        edge = edge_model_factory(config, 10, partition_id)().eval()
        with torch.no_grad():
            _, features = edge(partition.train.images)
        ranges.append(feature_range(features))
    return largest_ratio(ranges)


def quickstart(edge: Callable[[], torch.nn.Module]) -> float:
    model, ranges = edge().eval(), []
    for partition_id in range(4):
        data = load_partition(partition_id, 4, "digits")["train"].with_transform(apply_transforms)
        images = torch.stack([data[i]["img"] for i in range(len(data))])
        with torch.no_grad():
            _, features = model(images)
        ranges.append(feature_range(features))
    return largest_ratio(ranges)


def main() -> None:
    torch.set_num_threads(2)
    for dataset in ("digits", "synthetic"):
        for shared in (False, True):
            extractors = "one shared stem" if shared else "own stems"
            print(f"ResNet-8, {dataset}, 3 nodes, {extractors}: {resnet8(dataset, shared):.2f}x")
    print(f"quickstart Net, digits, 4 nodes: {quickstart(lambda: net_pair(42).edge):.2f}x")
    print(f"MLP, digits, 4 nodes: {quickstart(lambda: model_pairs.mlp_split(42).edge):.2f}x")


if __name__ == "__main__":
    main()
