import numpy as np
import pytest
import torch

import flwr_fedgkt.edge as edge_module
from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.edge import EdgeTrainer, LogitTable


def _samples(n: int = 48, num_classes: int = 10) -> SampleSet:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=gen)[:n]  # sparse, unordered ids
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return SampleSet(torch.randn(n, 3, 32, 32, generator=gen), labels, ids)


def test_kd_targets_are_looked_up_by_sample_id_under_shuffling(monkeypatch) -> None:
    # Prepare: each sample's teacher logits encode its own label in column 0, and the
    # table is stored in an order unrelated to the data's, so a lookup by batch
    # position (or by row order) would pair samples with other samples' targets.
    data = _samples()
    teacher_logits = torch.zeros(len(data), 10)
    teacher_logits[:, 0] = data.labels.float()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    table = LogitTable(data.ids[order].numpy(), teacher_logits[order].numpy())
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = edge_module.ce_kd_loss

    def recording(logits, labels, teacher, temperature=3.0, alpha=1.0):
        seen.append((labels.clone(), teacher.clone()))
        return real(logits, labels, teacher, temperature, alpha)

    monkeypatch.setattr(edge_module, "ce_kd_loss", recording)
    trainer = EdgeTrainer(10, seed=0, device="cpu")
    # Execute
    trainer.train(
        data, epochs=2, batch_size=16, teacher=table, generator=torch.Generator().manual_seed(2)
    )
    # Assert: every batch was distilled against its own samples' targets
    assert len(seen) == 6
    for labels, teacher in seen:
        assert torch.equal(teacher[:, 0], labels.float())


def test_logit_table_marks_samples_without_a_target() -> None:
    table = LogitTable(np.array([7, 3, 11]), np.eye(3, dtype=np.float32))
    logits, found = table.lookup(torch.tensor([11, 5, 3]))
    assert found.tolist() == [True, False, True]
    assert torch.equal(logits[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(logits[2], torch.tensor([0.0, 1.0, 0.0]))


def test_logit_table_refuses_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        LogitTable(np.array([1, 1]), np.zeros((2, 4), dtype=np.float32))


def test_extract_returns_features_logits_labels_and_ids_in_eval_mode() -> None:
    data = _samples(20)
    trainer = EdgeTrainer(10, seed=0, device="cpu")
    trainer.model.train()
    first = trainer.extract(data, batch_size=7)
    second = trainer.extract(data, batch_size=20)
    assert first.features.shape == (20, 16, 32, 32)
    assert first.logits.shape == (20, 10)
    assert torch.equal(first.ids, data.ids) and torch.equal(first.labels, data.labels)
    # eval mode: per-sample results do not depend on how samples are batched
    assert torch.allclose(first.logits, second.logits, atol=1e-5)
    assert not trainer.model.training


def test_training_reduces_the_loss_and_state_round_trips() -> None:
    data = _samples(64)
    trainer = EdgeTrainer(10, seed=0, device="cpu")
    first = trainer.train(data, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(0))
    for _ in range(8):
        last = trainer.train(
            data, epochs=1, batch_size=16, generator=torch.Generator().manual_seed(0)
        )
    assert last["train_loss"] < first["train_loss"]
    clone = EdgeTrainer(10, seed=99, device="cpu")
    clone.load_state_bytes(trainer.state_bytes())
    for a, b in zip(
        trainer.model.state_dict().values(), clone.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert (
        clone.optimizer.state_dict()["state"].keys()
        == trainer.optimizer.state_dict()["state"].keys()
    )


def test_extraction_in_small_channels_last_batches_gives_the_plain_forward_pass() -> None:
    # Prepare: a trained edge model, and a copy of it as it was before any
    # extraction (contiguous layout, never probed)
    import copy

    gen = torch.Generator().manual_seed(5)
    data = SampleSet(
        torch.randn(70, 3, 32, 32, generator=gen), torch.arange(70) % 10, torch.arange(70)
    )
    trainer = EdgeTrainer(10, device="cpu", seed=5, precision="float32", torch_threads=1)
    trainer.train(data, epochs=1, batch_size=16)
    plain = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format).eval()
    # Execute: the trainer's extraction (batches of 32, channels-last) and one plain
    # forward pass over all 70 images at once
    extracted = trainer.extract(data)
    with torch.no_grad():
        logits, features = plain(data.images.contiguous())
    # Assert: the same features and logits, in order, contiguous for the wire
    assert trainer._channels_last is True
    assert extracted.features.is_contiguous()
    torch.testing.assert_close(extracted.features, features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extracted.logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(extracted.ids, torch.arange(70))


def test_server_logits_in_small_batches_are_those_of_one_large_batch() -> None:
    from flwr_fedgkt.server import ServerTrainer

    # Prepare
    trainer = ServerTrainer(10, device="cpu", seed=2, precision="float32", torch_threads=1)
    features = torch.relu(torch.randn(70, 16, 32, 32, generator=torch.Generator().manual_seed(2)))
    # Execute
    small, large = trainer.predict(features), trainer.predict(features, batch_size=256)
    # Assert
    assert small.shape == (70, 10)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)
