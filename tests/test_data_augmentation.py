"""The training augmentation: torchvision's crop-and-flip per image, ids kept."""

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as tvf

from flwr_fedgkt.data import RandomCropFlip, SampleSet
from flwr_fedgkt.edge import EdgeTrainer, LogitTable
from flwr_fedgkt.edge_data import training_batches

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    return tvf.normalize(raw, list(MEAN), list(STD))


def _crop_and_flip(raw: torch.Tensor, augmented: torch.Tensor) -> tuple[int, int, bool] | None:
    """The ``(top, left, flip)`` that turns ``raw`` (an un-normalised image) into
    ``augmented`` (normalised): pad with 4 black pixels, crop 32 x 32 at (top, left),
    flip if ``flip``, normalise. ``None`` when nothing does."""
    padded = tvf.pad(raw, [4], fill=0.0)
    for top in range(9):
        for left in range(9):
            crop = tvf.crop(padded, top, left, 32, 32)
            for flip in (False, True):
                candidate = _normalise(tvf.horizontal_flip(crop) if flip else crop)
                if torch.allclose(candidate, augmented, atol=1e-5, rtol=0):
                    return top, left, flip
    return None


def test_augmentation_is_a_crop_of_the_black_padded_raw_image_then_a_flip() -> None:
    # Prepare
    raw = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augment = RandomCropFlip(MEAN, STD)
    # Execute
    out = augment(_normalise(raw), torch.Generator().manual_seed(1))
    # Assert: every image is its own raw image, padded with black (in normalised
    # values), cropped and maybe flipped, then normalised
    found = [_crop_and_flip(raw[i], out[i]) for i in range(16)]
    assert None not in found
    assert out.shape == raw.shape and out.dtype == raw.dtype


def test_every_image_of_a_batch_gets_its_own_crop_and_flip() -> None:
    # Prepare
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = _normalise(image.repeat(64, 1, 1, 1))
    augment = RandomCropFlip(MEAN, STD)
    # Execute
    out = augment(batch, torch.Generator().manual_seed(2))
    # Assert
    found = [_crop_and_flip(image[0], augmented) for augmented in out]
    assert None not in found
    tops, lefts, flips = zip(*found, strict=True)  # type: ignore[misc]
    assert len(set(tops)) > 3 and len(set(lefts)) > 3
    assert 0 < sum(flips) < 64
    assert len({(t, left) for t, left, _ in found}) > 10


def test_augmentation_repeats_with_its_generator_and_ignores_the_global_one() -> None:
    # Prepare
    batch = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    augment = RandomCropFlip(MEAN, STD)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    # Execute
    first = augment(batch, torch.Generator().manual_seed(5))
    after_first = torch.get_rng_state()
    torch.manual_seed(456)  # another global state: the same result
    again = augment(batch, torch.Generator().manual_seed(5))
    other_seed = augment(batch, torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(5)
    consecutive = [augment(batch, generator), augment(batch, generator)]
    # Assert
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    assert torch.equal(after_first, global_state)  # the global generator is untouched
    assert torch.equal(consecutive[0], first)
    assert not torch.equal(consecutive[0], consecutive[1])  # the generator moved on


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
