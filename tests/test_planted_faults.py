"""Tests that catch six faults which each, planted alone, pass the other unit tests.

1. the edge KD term not weighted by the share of a batch's samples that have
   server logits;
2. a restored NodeRegistry that rebuilds key -> node but not node -> key;
3. the float16 feature encoder clamping negative features to 0;
4. the held-features digest computed over only the first 4 KiB of an array;
5. the edge-logit bound checking large positive logits only;
6. the edge's shuffling ignoring the run's seed.

Every expected value is computed by hand (plain ``math``), not by the package.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flwr_fedgkt.codec import (
    EncodedFeatures,
    FeaturePayload,
    PayloadError,
    decode_features,
    encode_features,
    encoded_digest,
)
from flwr_fedgkt.edge import EdgeTrainer, Extracted, LogitTable
from flwr_fedgkt.node import EdgeNode, EdgeSettings
from flwr_fedgkt.registry import NodeRegistry, features_digest
from flwr_fedgkt.validation import validate_payload, validate_update


def _name(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that has it (the package is being
    split into new modules; the old path is tried first)."""
    for module in modules:
        found = getattr(importlib.import_module(module), name, None)
        if found is not None:
            return found
    raise ImportError(f"none of {', '.join(modules)} has {name!r}")


edge_generator = _name("edge_generator", "flwr_fedgkt.edge", "flwr_fedgkt.edge_data")
training_batches = _name("training_batches", "flwr_fedgkt.edge", "flwr_fedgkt.edge_data")

# -- helpers -----------------------------------------------------------------------------


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_sum = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_sum for v in row]


def _cross_entropy(row: list[float], label: int) -> float:
    return -_log_softmax(row)[label]


def _kd(student: list[float], teacher: list[float], temperature: float) -> float:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` of one sample."""
    log_s = _log_softmax([v / temperature for v in student])
    log_t = _log_softmax([v / temperature for v in teacher])
    kl = sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s, strict=True))
    return temperature**2 * kl


class _InputIsLogits(nn.Module):
    """An edge model whose logits are its inputs (times a weight of 1): the loss of
    a batch can be computed by hand from the inputs alone."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.weight, x


class _RecordsOrder(nn.Module):
    """An edge model fed one number per sample, its sample id; while training it
    records the ids in the order it sees them."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.head = nn.Linear(1, num_classes)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self.seen.extend(int(v) for v in x[:, 0].round().tolist())
        return self.head(x), x.view(len(x), 1, 1, 1)


def _id_samples(n: int = 32) -> list[tuple[torch.Tensor, int, int]]:
    """``n`` ``(x, y, sample_id)`` items whose input is the sample id itself."""
    return [(torch.tensor([float(100 + i)]), i % 2, 100 + i) for i in range(n)]


def _reply_arrays(logits: np.ndarray, n: int = 2, num_classes: int = 3) -> dict[str, np.ndarray]:
    return {
        "features": np.ones((n, 2, 2, 2), dtype=np.float32),
        "logits": logits.astype(np.float32),
        "labels": np.arange(n, dtype=np.int64) % num_classes,
        "ids": np.arange(n, dtype=np.int64),
    }


# -- 1. KD weighted by the share of samples with server logits -----------------------------


def test_edge_kd_term_is_weighted_by_the_share_of_samples_with_server_logits() -> None:
    # Prepare: one batch of four samples whose logits are their inputs; the server
    # has logits for two of them (ids 10 and 12), so the share is 1/2.
    rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
    labels = [0, 2, 1, 1]
    ids = [10, 11, 12, 13]
    teacher_rows = {10: [0.0, 2.0, 0.0], 12: [1.0, 0.0, -1.0]}
    data = [(torch.tensor(r), y, i) for r, y, i in zip(rows, labels, ids, strict=True)]
    table = LogitTable(np.array(list(teacher_rows)), np.array(list(teacher_rows.values())))
    temperature, alpha = 2.0, 0.5
    trainer = EdgeTrainer(model=_InputIsLogits(), device="cpu", lr=0.0)
    # hand computation: CE over all four, KD averaged over the two with a target,
    # weighted by their share 2/4
    ce = sum(_cross_entropy(r, y) for r, y in zip(rows, labels, strict=True)) / 4
    kd_found = sum(_kd(rows[ids.index(i)], t, temperature) for i, t in teacher_rows.items()) / 2
    share = 2 / 4
    assert kd_found > 0.1  # the KD term is large enough to tell a missing share apart

    # Execute: one epoch of one batch (its loss is computed before the step)
    metrics = trainer.train(
        data,
        epochs=1,
        batch_size=4,
        teacher=table,
        temperature=temperature,
        alpha=alpha,
        generator=torch.Generator().manual_seed(0),
    )

    # Assert: loss = CE + alpha * share * KD(samples with logits); kd = share * KD
    assert metrics["train_ce"] == pytest.approx(ce, rel=1e-5)
    assert metrics["train_kd"] == pytest.approx(share * kd_found, rel=1e-5)
    assert metrics["train_loss"] == pytest.approx(ce + alpha * share * kd_found, rel=1e-5)


# -- 2. a restored registry maps node ids back to their keys ---------------------------------


def test_restored_registry_gives_each_node_id_its_key_back() -> None:
    # Prepare: two keys bound to two node ids
    registry = NodeRegistry()
    registry.commit("0", 101)
    registry.commit("1", 202)
    restored = NodeRegistry()

    # Execute
    restored.restore(registry.state())

    # Assert: both directions survive the checkpoint
    assert restored.node_of("0") == 101 and restored.node_of("1") == 202
    assert restored.key_of(101) == "0"
    assert restored.key_of(202) == "1"
    assert restored.key_of(303) is None
    # and node 101 still may not speak for another key
    with pytest.raises(PayloadError, match="already speaks for"):
        restored.check_binding("1", 101, connected={101, 202})


# -- 3. float16 keeps negative features ----------------------------------------------------


@pytest.mark.parametrize(
    "dtype, rel", [("float32", 2**-24), ("float16", 2**-11), ("bfloat16", 2**-8)]
)
def test_negative_features_round_trip_through_the_float_codecs(dtype: str, rel: float) -> None:
    # Prepare: features with negative, zero and positive values
    values = [-1.5, -0.333, -1000.0, -(2.0**-6), 0.0, 0.25, 3.0, 7.5]
    features = torch.tensor(values, dtype=torch.float32).view(2, 4, 1, 1)

    # Execute
    back = decode_features(encode_features(features, dtype))

    # Assert: every value comes back within the dtype's relative precision, sign kept
    assert back.shape == features.shape
    for got, want in zip(back.flatten().tolist(), values, strict=True):
        assert got == pytest.approx(want, rel=rel, abs=0.0)
    assert (back.flatten()[:4] < 0).all()


# -- 4. the features digest covers every byte -----------------------------------------------


def _payload(features: np.ndarray) -> FeaturePayload:
    n = features.shape[0]
    return FeaturePayload(
        features=EncodedFeatures("float32", features),
        logits=np.zeros((n, 3), dtype=np.float32),
        labels=np.zeros(n, dtype=np.int64),
        ids=np.arange(n, dtype=np.int64),
    )


def test_features_digest_sees_a_difference_beyond_the_first_4_kib() -> None:
    # Prepare: 2 x 4 x 16 x 16 float32 features (8 KiB); the copy differs only in
    # the last value, at byte 8188, far beyond the first 4096 bytes
    features = np.ones((2, 4, 16, 16), dtype=np.float32)
    changed = features.copy()
    changed[-1, -1, -1, -1] = 2.0
    assert features.nbytes == 8192
    assert np.array_equal(features.reshape(-1)[:1024], changed.reshape(-1)[:1024])

    # Execute
    same = features_digest(_payload(features.copy()))
    first = features_digest(_payload(features))
    second = features_digest(_payload(changed))

    # Assert: equal bytes give equal digests; a late difference changes it
    assert first == same
    assert first != second
    assert encoded_digest(EncodedFeatures("float32", features)) != encoded_digest(
        EncodedFeatures("float32", changed)
    )


def test_edge_resends_features_that_changed_beyond_the_first_4_kib() -> None:
    # Prepare: the server holds the digest of the node's last features (8 KiB);
    # this round only the last value changed
    old = torch.ones(2, 4, 16, 16)
    new = old.clone()
    new[-1, -1, -1, -1] = 2.0
    held = encoded_digest(encode_features(old, "float32"))
    extracted = Extracted(new, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2))

    # Execute
    arrays = extracted.arrays("float32", held=held)

    # Assert: the changed features go up, not only ids and logits
    assert "features" in arrays
    assert arrays["features"].reshape(-1)[-1] == 2.0


# -- 5. the logit bound holds for negative logits too -------------------------------------------


@pytest.mark.parametrize("extreme", [1e6, -1e6])
def test_reply_with_an_edge_logit_beyond_the_bound_is_rejected(extreme: float) -> None:
    # Prepare: one reply with an honest logit, one with +-1e6 (bound 1e4)
    honest = np.zeros((2, 3), dtype=np.float32)
    honest[0, 1] = -50.0
    hostile = honest.copy()
    hostile[1, 2] = extreme

    # Execute / Assert: the honest reply passes, the hostile one is rejected
    accepted = validate_payload(_reply_arrays(honest), "float32", (2, 2, 2), 3)
    assert accepted.logits[0, 1] == -50.0
    with pytest.raises(PayloadError, match="logits"):
        validate_payload(_reply_arrays(hostile), "float32", (2, 2, 2), 3)
    with pytest.raises(PayloadError, match="logits"):
        validate_update({"ids": np.arange(2, dtype=np.int64), "logits": hostile}, accepted, 3)


def test_logit_bound_is_checked_on_magnitude_with_a_custom_bound() -> None:
    # Prepare: logits -20 and +5 against a bound of 10
    logits = np.array([[-20.0, 0.0, 5.0], [0.0, 0.0, 0.0]], dtype=np.float32)

    # Execute / Assert: |-20| > 10 is rejected; with a bound of 30 it passes
    with pytest.raises(PayloadError, match="logits"):
        validate_payload(_reply_arrays(logits), "float32", (2, 2, 2), 3, max_logit_abs=10.0)
    validate_payload(_reply_arrays(logits), "float32", (2, 2, 2), 3, max_logit_abs=30.0)


# -- 6. the edge's shuffling follows the run's seed ----------------------------------------------


def _epoch_order(seed: int, partition_id: int = 0, server_round: int = 1) -> list[int]:
    batches = training_batches(
        _id_samples(), batch_size=8, generator=edge_generator(seed, partition_id, server_round)
    )
    return [int(i) for _, _, ids in batches for i in ids]


def test_edge_generator_orders_samples_by_the_runs_seed() -> None:
    # Prepare: 32 samples (ids 100..131)
    all_ids = list(range(100, 132))

    # Execute
    seed_1, seed_1_again, seed_2 = _epoch_order(1), _epoch_order(1), _epoch_order(2)

    # Assert: each order is a permutation; same seed, same order; other seed, other order
    for order in (seed_1, seed_1_again, seed_2):
        assert sorted(order) == all_ids
    assert seed_1 != all_ids  # shuffled at all
    assert seed_1 == seed_1_again
    assert seed_1 != seed_2


class _NoStates:
    """An edge-state store that holds nothing: every round starts afresh."""

    def load(self, before_round: int | None = None) -> bytes | None:
        return None

    def save(self, blob: bytes, server_round: int = 0) -> None:
        pass


def _node_order(seed: int) -> list[int]:
    model = _RecordsOrder()
    node = EdgeNode(
        lambda: model,
        _NoStates(),
        EdgeSettings(epochs=1, batch_size=8),
        seed=seed,
        stream=0,
        device="cpu",
    )
    node.train(_id_samples(), server_round=1, teacher=None)
    return model.seen


def test_edge_node_trains_in_the_order_its_seed_gives(one_thread) -> None:
    # Prepare: nodes identical but for the run's seed

    # Execute
    seed_1, seed_1_again, seed_2 = _node_order(1), _node_order(1), _node_order(2)

    # Assert: the samples the model trained on, in order, follow the seed
    assert sorted(seed_1) == list(range(100, 132))
    assert seed_1 == seed_1_again
    assert seed_1 != seed_2
