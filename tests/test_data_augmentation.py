"""The training augmentation: torchvision's crop-and-flip per image, ids kept."""

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as tvf

from flwr_fedgkt.data import RandomCropFlip, SampleSet
from flwr_fedgkt.edge import EdgeTrainer, LogitTable, training_batches

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    return tvf.normalize(raw, list(MEAN), list(STD))


def test_augmentation_equals_torchvision_crop_and_flip_on_the_raw_image() -> None:
    # Prepare
    raw = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augment = RandomCropFlip(MEAN, STD)
    top, left, flip = augment.parameters(16, torch.Generator().manual_seed(1))
    # Execute
    out = augment.apply(_normalise(raw), top, left, flip)
    # Assert: pad with black, crop at (top, left), flip, then normalise
    for i in range(16):
        padded = tvf.pad(raw[i], [4], fill=0.0)
        expected = tvf.crop(padded, int(top[i]), int(left[i]), 32, 32)
        if flip[i]:
            expected = tvf.horizontal_flip(expected)
        torch.testing.assert_close(out[i], _normalise(expected), atol=1e-5, rtol=0)


def test_every_image_of_a_batch_gets_its_own_crop_and_flip() -> None:
    # Prepare
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = image.repeat(64, 1, 1, 1)
    augment = RandomCropFlip(MEAN, STD)
    # Execute
    out = augment(batch, torch.Generator().manual_seed(2))
    top, left, flip = augment.parameters(64, torch.Generator().manual_seed(2))
    # Assert
    distinct = {tuple(t.flatten()[:50].tolist()) for t in out}
    assert len(distinct) > 10
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1
    assert 0 < int(flip.sum()) < 64
    assert torch.equal(out, augment(batch, torch.Generator().manual_seed(2)))


def test_batches_keep_each_image_with_its_id_and_label() -> None:
    # Prepare: every image is filled with its id, so an augmented image still
    # shows which sample it is (its pixels are its id or the black padding, 0)
    ids = torch.arange(100, 164)
    images = ids.float().view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    labels = ids % 10
    data = SampleSet(images, labels, ids, RandomCropFlip((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    # Execute
    batches = list(training_batches(data, 16, torch.Generator().manual_seed(0)))
    # Assert
    seen = torch.cat([b_ids for _, _, b_ids in batches])
    assert sorted(seen.tolist()) == ids.tolist()
    for b_images, b_labels, b_ids in batches:
        assert torch.equal(b_images.amax(dim=(1, 2, 3)), b_ids.float())
        assert torch.equal(b_labels, b_ids % 10)
        assert bool((b_images == 0).any())  # padding came in: they were augmented


def test_training_augments_and_extraction_does_not() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    n = 48
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.arange(n) % 10
    calls = []

    def spy(batch: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        calls.append(len(batch))
        return RandomCropFlip(MEAN, STD)(batch, generator)

    data = SampleSet(images, labels, torch.arange(n), spy)
    plain = dataclasses.replace(data, augmentation=None)
    trainer = EdgeTrainer(10, device="cpu", seed=0)
    teacher = LogitTable(torch.arange(n), torch.randn(n, 10, generator=gen))
    # Execute
    trainer.train(data, epochs=1, batch_size=16, teacher=teacher, generator=gen)
    trained_calls = list(calls)
    first = trainer.extract(data)
    second = trainer.extract(plain)
    # Assert
    assert trained_calls == [16, 16, 16]
    assert calls == trained_calls  # extraction did not augment
    assert torch.equal(first.features, second.features)
    assert torch.equal(first.ids, data.ids)


@pytest.mark.parametrize("augmented", [False, True])
def test_seeded_training_is_reproducible(augmented: bool) -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 32, 32, generator=gen)
    augmentation = RandomCropFlip(MEAN, STD) if augmented else None
    data = SampleSet(images, torch.arange(32) % 10, torch.arange(32), augmentation)
    # Execute
    results = []
    for _ in range(2):
        trainer = EdgeTrainer(10, device="cpu", seed=0)
        results.append(
            trainer.train(data, epochs=1, batch_size=8, generator=torch.Generator().manual_seed(3))
        )
    # Assert
    assert results[0] == results[1]
