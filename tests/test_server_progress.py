"""Long server work shows progress: one log line per server epoch that takes longer
than the threshold (loss with its CE and KD parts, samples/s)."""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.server import PROGRESS_SECONDS, ServerTrainer
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

SHAPE = (16, 8, 8)


def _store(n: int = 24) -> FeatureStore:
    gen = torch.Generator().manual_seed(0)
    arrays = encode_features(torch.relu(torch.randn(n, *SHAPE, generator=gen)), "float32").arrays()
    arrays.update(
        logits=torch.randn(n, 10, generator=gen).numpy(),
        labels=np.arange(n, dtype=np.int64) % 10,
        ids=np.arange(n, dtype=np.int64),
    )
    store = FeatureStore()
    store.put("1", validate_payload(arrays, "float32", SHAPE, 10), 1)
    return store


def test_each_long_server_epoch_logs_its_loss_parts_and_speed(caplog) -> None:
    trainer = ServerTrainer(10, batch_size=8, seed=0, device="cpu")
    trainer.progress_seconds = 0.0  # every epoch counts as long
    with caplog.at_level(logging.INFO, logger="flwr.fedgkt"):
        result = trainer.train(_store(), epochs=2)
    lines = [r.getMessage() for r in caplog.records if "server epoch" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["server epoch 1/2", "server epoch 2/2"]
    pattern = (
        r"server epoch 2/2: loss ([0-9.]+) \(CE ([0-9.]+), KD ([0-9.]+)\) \| 24 samples in "
        r"[0-9.]+ s \([0-9]+ samples/s\)"
    )
    loss, ce, kd = map(float, re.fullmatch(pattern, lines[1]).groups())
    assert loss == round(result.loss, 4) and ce == round(result.ce, 4)
    assert abs(loss - (ce + kd)) < 1e-3  # alpha = 1: loss = CE + KD


def test_short_epochs_log_nothing(caplog) -> None:
    assert PROGRESS_SECONDS == 5.0
    trainer = ServerTrainer(10, batch_size=8, seed=0, device="cpu")
    with caplog.at_level(logging.INFO, logger="flwr.fedgkt"):
        trainer.train(_store(), epochs=2)
    assert not [r for r in caplog.records if "server epoch" in r.getMessage()]
