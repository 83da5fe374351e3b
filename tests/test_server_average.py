"""The server model's moving average (``server-average``): what it averages, at
what rate, and that the logits, the scores, the final model and checkpoints use it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from flwr_fedgkt import ServerTrainer, encode_features
from flwr_fedgkt.asynchronous import AsyncFedGKT
from flwr_fedgkt.server import ASYNC_AVERAGE
from flwr_fedgkt.settings import RunConfig
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.strategy import FedGKT
from flwr_fedgkt.validation import validate_payload

WIDTH, CLASSES = 6, 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(WIDTH, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES)
    )


def _store(samples: int = 32) -> FeatureStore:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(samples, WIDTH, generator=gen)
    store = FeatureStore()
    payload = validate_payload(
        {
            **encode_features(features, "float32").arrays(),
            "logits": torch.randn(samples, CLASSES, generator=gen).numpy(),
            "labels": np.arange(samples) % CLASSES,
            "ids": np.arange(samples),
        },
        "float32",
        (WIDTH,),
        CLASSES,
    )
    store.put("0", payload, 1)
    return store


def _trainer(average: float | None) -> ServerTrainer:
    return ServerTrainer(
        model=_mlp(),
        feature_shape=(WIDTH,),
        batch_size=8,
        device="cpu",
        precision="float32",
        average=average,
    )


def _states_after_each_step(trainer: ServerTrainer) -> list[dict[str, torch.Tensor]]:
    """The live model's state after every optimizer step of the trainer."""
    seen: list[dict[str, torch.Tensor]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return out

    trainer.optimizer.step = recording_step  # type: ignore[method-assign]
    return seen


def test_the_average_follows_the_steps_at_the_stated_rate() -> None:
    # Prepare: 32 samples in batches of 8 are 4 steps an epoch; 0.5 of the average
    # remains after an epoch, so 0.5 ** (1/4) after each step, but in the first
    # steps at most (1 + n) / (10 + n) at step n
    trainer = _trainer(0.5)
    states = _states_after_each_step(trainer)
    # Execute: 16 epochs (64 steps: from step 47 on, 0.5 ** (1/4) is the smaller)
    trainer.train(_store(), epochs=16)
    # Assert: by hand, the first step's weights, then a blend after each step
    assert len(states) == 64
    keep = 0.5**0.25
    expected = {k: v.clone() for k, v in states[0].items() if v.is_floating_point()}
    for n, state in enumerate(states[1:], start=1):
        kept = min(keep, (1 + n) / (10 + n))  # the warm-up: less kept in the first steps
        for k in expected:
            expected[k] = kept * expected[k] + (1 - kept) * state[k]
    averaged = trainer.averaged.state_dict()
    for k, value in expected.items():
        torch.testing.assert_close(averaged[k], value, rtol=1e-5, atol=1e-6)
    # BatchNorm's running statistics are averaged too, its batch count copied
    assert "1.running_mean" in expected
    assert int(averaged["1.num_batches_tracked"]) == int(states[-1]["1.num_batches_tracked"])
    # and the average is not the live model
    live = trainer.model.state_dict()
    assert not torch.allclose(averaged["0.weight"], live["0.weight"])


def test_logits_and_scores_come_from_the_average_and_the_model_keeps_training() -> None:
    # Prepare
    trainer = _trainer(0.5)
    store = _store()
    trainer.train(store, epochs=2)
    features = store.node_features("0").float()
    labels = torch.as_tensor(store.payload("0").labels)
    # Execute
    _, logits = trainer.logits_for(store, "0")
    scores = trainer.evaluate(features, labels)
    # Assert: the averaged model's outputs, not the live model's
    trainer.averaged.eval()
    trainer.model.eval()
    with torch.no_grad():
        from_average = trainer.averaged(features)
        from_live = trainer.model(features)
    assert not torch.allclose(from_average, from_live)
    np.testing.assert_allclose(logits, from_average.numpy(), rtol=1e-5, atol=1e-6)
    accuracy = float((from_average.argmax(1) == labels).float().mean())
    assert scores["accuracy"] == pytest.approx(accuracy)
    assert trainer.scored_model is trainer.averaged


def test_without_an_average_everything_comes_from_the_model() -> None:
    trainer = _trainer(0.0)
    trainer.train(_store(), epochs=1)
    assert trainer.averaged is None and trainer.scored_model is trainer.model


def test_a_checkpoint_carries_the_average() -> None:
    # Prepare
    trainer = _trainer(0.5)
    trainer.train(_store(), epochs=1)
    state = copy.deepcopy(trainer.state_dict())  # as written to disk: no shared tensors
    # Execute
    resumed = _trainer(0.5)
    resumed.load_state_dict(state)
    # Assert: the same average, and the next epoch continues it alike
    for k, v in trainer.averaged.state_dict().items():
        assert torch.equal(resumed.averaged.state_dict()[k], v)
    trainer.train(_store(), epochs=1)
    resumed.train(_store(), epochs=1)
    for k, v in trainer.averaged.state_dict().items():
        torch.testing.assert_close(resumed.averaged.state_dict()[k], v)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0])
def test_an_average_out_of_range_is_refused_by_name(value) -> None:
    with pytest.raises(ValueError, match="server-average"):
        RunConfig.from_mapping({"server-average": value})
    with pytest.raises(ValueError, match="average"):
        _trainer(value)


def test_the_schedule_sets_the_default_average_and_a_given_one_is_kept() -> None:
    # Prepare: the run config's default (-1) leaves the choice to the schedule
    config = RunConfig.from_mapping({"device": "cpu"})
    assert config.server_average == -1
    assert ServerTrainer.from_run_config(config, num_classes=10).average is None
    # Execute
    rounds = FedGKT(_trainer(None))
    asynchronous = AsyncFedGKT(_trainer(None))
    without = AsyncFedGKT(_trainer(0.0))
    chosen = FedGKT(_trainer(0.25))
    bare = AsyncFedGKT(_mlp(), feature_shape=(WIDTH,), server_average=0.75)
    # Assert: async averages by default, rounds do not; a value given is kept
    assert not rounds.trainer.average
    assert asynchronous.trainer.average == ASYNC_AVERAGE == 0.5
    assert without.trainer.average == 0.0
    assert chosen.trainer.average == 0.25
    assert bare.trainer.average == 0.75
