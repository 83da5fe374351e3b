"""Parameters, FLOPs and bytes on the wire (flwr_fedgkt.accounting)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flwr_fedgkt.accounting import (
    ByteLedger,
    content_bytes,
    count_flops,
    edge_round_flops,
    model_profile,
)
from flwr_fedgkt.models import build_model
from flwr_fedgkt.records import arrays_bytes

# -- parameters and FLOPs ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mflops",
    [("resnet8", 56.8), ("resnet56", 522.4), ("resnet110", 1003.7)],
)
def test_training_flops_per_sample_are_the_measured_figures(name: str, mflops: float) -> None:
    # Prepare / Execute
    profile = model_profile(name)
    # Assert: forward + backward of one 3x32x32 sample, within 0.1 %
    assert profile["train_flops_per_sample"] / 1e6 == pytest.approx(mflops, rel=1e-3)
    assert profile["forward_flops_per_sample"] < profile["train_flops_per_sample"]


@pytest.mark.parametrize(
    "full, flop_range, param_range",
    [
        ("resnet56", (8.5, 10.0), (54.0, 58.0)),  # paper: about 9x FLOPs, 54x params
        ("resnet110", (16.0, 18.5), (104.0, 110.0)),  # paper: about 17x FLOPs, 105x params
    ],
)
def test_full_model_over_edge_model_ratios_lie_in_the_papers_range(
    full: str, flop_range: tuple[float, float], param_range: tuple[float, float]
) -> None:
    # Prepare
    edge = model_profile("resnet8")
    large = model_profile(full)
    # Execute
    flop_ratio = large["train_flops_per_sample"] / edge["train_flops_per_sample"]
    param_ratio = large["params"] / edge["params"]
    # Assert
    assert flop_range[0] <= flop_ratio <= flop_range[1], flop_ratio
    assert param_range[0] <= param_ratio <= param_range[1], param_ratio


def test_parameter_counts_of_edge_and_full_models() -> None:
    # Prepare / Execute
    params = {name: model_profile(name)["params"] for name in ("resnet8", "resnet56", "resnet110")}
    # Assert
    assert params == {"resnet8": 10_586, "resnet56": 591_322, "resnet110": 1_147_738}


def test_counting_on_the_meta_device_gives_the_same_flops_as_on_the_cpu() -> None:
    # Prepare
    real = build_model("resnet8")
    with torch.device("meta"):
        shapes_only = build_model("resnet8")
    # Execute / Assert
    assert count_flops(shapes_only, (3, 32, 32)) == count_flops(real, (3, 32, 32))


def test_edge_round_flops_adds_training_and_inference_passes() -> None:
    # Prepare
    profile = {"train_flops_per_sample": 30.0, "forward_flops_per_sample": 10.0}
    # Execute
    flops = edge_round_flops(profile, train_samples=100, epochs=2, forward_samples=[100, 25])
    # Assert: 2 epochs x 100 samples x 30 + (100 + 25) x 10
    assert flops == 2 * 100 * 30 + 125 * 10


# -- bytes on the wire ---------------------------------------------------------------


def _content(seed: int = 0) -> tuple[RecordDict, list[ArrayRecord]]:
    rng = np.random.default_rng(seed)
    first = ArrayRecord(
        {
            "features": Array(rng.standard_normal((7, 16, 4, 4)).astype(np.float16)),
            "ids": Array(np.arange(7, dtype=np.int64)),
        }
    )
    second = ArrayRecord({"logits": Array(rng.standard_normal((7, 10)).astype(np.float32))})
    content = RecordDict(
        {
            "features": first,
            "server_logits": second,
            "config": ConfigRecord({"server-round": 3, "feature-dtype": "float16"}),
            "metrics": MetricRecord({"num-examples": 7, "accuracy": 0.5}),
        }
    )
    return content, [first, second]


def test_content_bytes_is_the_sum_of_the_array_records_sizes() -> None:
    # Prepare
    content, records = _content()
    expected = sum(record.count_bytes() for record in records)
    # Execute
    counted = content_bytes(content)
    # Assert: exactly the ArrayRecords, as the FedGKT strategy counts them
    assert counted == expected
    assert counted == arrays_bytes(content)
    assert counted >= 7 * 16 * 4 * 4 * 2 + 7 * 8 + 7 * 10 * 4  # at least the raw buffers


def test_content_without_arrays_counts_zero_bytes() -> None:
    # Prepare
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    # Execute / Assert
    assert content_bytes(content) == 0


def test_ledger_sums_per_node_direction_and_phase() -> None:
    # Prepare
    ledger = ByteLedger()
    content_a, records_a = _content(0)
    content_b, records_b = _content(1)
    size_a = sum(r.count_bytes() for r in records_a)
    size_b = sum(r.count_bytes() for r in records_b)
    # Execute
    ledger.add_content(1, 11, "down", "train", content_a)
    ledger.add_content(1, 11, "up", "train", content_b)
    ledger.add_content(1, 11, "down", "evaluate", content_a)
    ledger.add_content(1, 22, "up", "evaluate", content_b)
    ledger.add(2, 11, "up", "train", 5)
    # Assert
    assert ledger.rounds() == [1, 2]
    assert ledger.nodes(1) == [11, 22]
    assert ledger.node_totals(1, 11) == {
        "bytes_down_train": size_a,
        "bytes_down_evaluate": size_a,
        "bytes_down": 2 * size_a,
        "bytes_up_train": size_b,
        "bytes_up_evaluate": 0,
        "bytes_up": size_b,
    }
    totals = ledger.round_totals(1)
    assert totals["bytes_down"] == 2 * size_a
    assert totals["bytes_up"] == 2 * size_b
    assert totals["bytes_up_evaluate"] == size_b
    assert [c["node_id"] for c in ledger.per_client(1)] == [11, 22]
    assert sum(c["bytes_up"] for c in ledger.per_client(1)) == totals["bytes_up"]
    assert ledger.round_totals(2)["bytes_up"] == 5
    assert ledger.round_totals(3)["bytes_up"] == 0


@pytest.mark.parametrize(
    "direction, phase, nbytes", [("sideways", "train", 1), ("up", "fit", 1), ("up", "train", -1)]
)
def test_ledger_refuses_unknown_directions_phases_and_negative_sizes(
    direction: str, phase: str, nbytes: int
) -> None:
    # Prepare
    ledger = ByteLedger()
    # Execute / Assert
    with pytest.raises(ValueError):
        ledger.add(1, 1, direction, phase, nbytes)
