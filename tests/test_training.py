"""The epoch loop shared by the edge, the server and the FedAvg baseline: sums
weighted by samples, declined steps counting for nothing, the last epoch's
figures."""

import pytest
import torch

from flwr_fedgkt.distill import DistillLoss
from flwr_fedgkt.training import train_epochs


def _batch(n: int, loss: float, ce: float, kd: float, correct: int):
    labels = torch.zeros(n, dtype=torch.long)
    logits = torch.zeros(n, 2)
    logits[correct:, 1] = 1.0  # the first `correct` rows predict class 0
    parts = DistillLoss(torch.tensor(loss), torch.tensor(ce), torch.tensor(kd))
    return parts, logits, labels


def test_means_are_weighted_by_samples_and_skip_declined_steps() -> None:
    # Prepare: three batches, the middle one declined
    batches = [_batch(2, 1.0, 0.5, 0.25, 2), None, _batch(6, 3.0, 2.0, 1.0, 3)]
    # Execute
    totals = train_epochs(1, lambda: batches, lambda b: b)
    # Assert: by hand, (2*1 + 6*3) / 8 = 2.5, (2*0.5 + 6*2) / 8 = 1.625, ...
    assert totals.seen == 8 and totals.correct == 5
    assert totals.means() == pytest.approx(
        {"loss": 2.5, "ce": 1.625, "kd": 0.8125, "accuracy": 5 / 8}
    )


def test_the_last_epochs_figures_are_returned_and_each_epoch_is_seen() -> None:
    # Prepare: epoch 1 has a loss of 4, epoch 2 of 1
    epochs = iter([[_batch(4, 4.0, 4.0, 0.0, 0)], [_batch(4, 1.0, 1.0, 0.0, 4)]])
    seen = []
    # Execute
    totals = train_epochs(2, lambda: next(epochs), lambda b: b, seen.append)
    # Assert
    assert [t.means()["loss"] for t in seen] == [4.0, 1.0]
    assert totals.means() == pytest.approx({"loss": 1.0, "ce": 1.0, "kd": 0.0, "accuracy": 1.0})


def test_no_epochs_run_no_step() -> None:
    calls = []
    totals = train_epochs(0, lambda: [1, 2], calls.append)
    assert calls == [] and totals.seen == 0
    assert totals.means() == {"loss": 0.0, "ce": 0.0, "kd": 0.0, "accuracy": 0.0}
