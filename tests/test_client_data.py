"""FedGKTClient with flwr-datasets / Hugging Face partitions (dict items), the
``image`` key fallback, a ``transform``, the check of the data and the edge model
when the client is built, and the node's check of its features against the
``feature-shape`` the server's round config names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from test_client import CLASSES, WIDTH, EdgeMLP, _context, _message
from torch import Tensor, nn

from flwr_fedgkt import FedGKTClient
from flwr_fedgkt.data import SampleSet
from flwr_fedgkt.node import RoundInstructions
from flwr_fedgkt.records import FEATURES_KEY
from flwr_fedgkt.records import record_arrays as arrays_of
from flwr_fedgkt.rounds import RoundEngine

pytestmark = pytest.mark.usefixtures("one_thread")

N = 10


def _pixels(n: int = N) -> np.ndarray:
    """``n`` images of 4 values each, float32."""
    return np.random.default_rng(3).normal(size=(n, 4)).astype(np.float32)


def _labels(n: int = N) -> list[int]:
    return [(3 * i + 1) % CLASSES for i in range(n)]


def _partition(image_key: str = "img", label_key: str = "label", n: int = N) -> Dataset:
    """A partition as flwr-datasets gives it: a ``datasets.Dataset`` of dict items."""
    return Dataset.from_dict({image_key: _pixels(n).tolist(), label_key: _labels(n)})


def _features_of(images: Tensor) -> np.ndarray:
    """What a fresh EdgeMLP extracts from ``images`` (the features of a round of 0
    epochs)."""
    with torch.no_grad():
        return EdgeMLP().eval().extractor(images).numpy()


def _uploaded(client: FedGKTClient, **config) -> dict[str, np.ndarray]:
    reply = client.train(_message(1, **config), _context())
    return arrays_of(reply.content.array_records[FEATURES_KEY])


@pytest.mark.parametrize("form", ["lists", "torch", "numpy"])
def test_a_flwr_datasets_partition_uploads_its_features_with_index_ids_and_labels(form) -> None:
    # Prepare: the partition as it comes (nested lists), or formatted
    partition = _partition()
    if form != "lists":
        partition = partition.with_format(form)
    client = FedGKTClient(EdgeMLP, partition, partition, epochs=0, batch_size=4)
    # Execute
    arrays = _uploaded(client)
    # Assert: row i is the model's features of item i, ids are the indices
    expected = _features_of(torch.as_tensor(_pixels()))
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(arrays["ids"], np.arange(N))
    np.testing.assert_array_equal(arrays["labels"], _labels())


def test_a_partition_trains_and_evaluates_over_rounds() -> None:
    # Prepare
    partition = _partition().with_format("torch")
    client = FedGKTClient(EdgeMLP, partition, partition, batch_size=4, epochs=2)
    context = _context()
    # Execute
    client.train(_message(1), context)
    scores = client.evaluate(_message(1), context).content.metric_records["metrics"]
    # Assert: the edge model trained on the partition's items
    trained = client.node(context).trainer().model
    assert not torch.equal(trained.head.weight, EdgeMLP().head.weight)
    assert scores["num-examples"] == N and 0.0 <= scores["edge-accuracy"] <= 1.0


def test_without_an_img_column_the_image_column_is_read() -> None:
    # Prepare: a partition whose images are under "image" (MNIST-like data sets)
    client = FedGKTClient(EdgeMLP, _partition(image_key="image"), epochs=0)
    # Execute
    arrays = _uploaded(client)
    # Assert
    expected = _features_of(torch.as_tensor(_pixels()))
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)


def test_keys_of_the_users_own_are_read() -> None:
    # Prepare: CIFAR-100-like columns
    partition = _partition(image_key="pixels", label_key="fine_label")
    client = FedGKTClient(EdgeMLP, partition, image_key="pixels", label_key="fine_label", epochs=0)
    # Execute
    arrays = _uploaded(client)
    # Assert
    np.testing.assert_array_equal(arrays["labels"], _labels())
    assert arrays["features"].shape == (N, WIDTH)


def test_a_transform_is_applied_to_every_image() -> None:
    # Prepare: a transform that shifts each image, counting its calls
    calls = []

    def shift(image: Tensor) -> Tensor:
        calls.append(1)
        return image + 5.0

    plain = FedGKTClient(EdgeMLP, _partition().with_format("torch"), epochs=0)
    shifted = FedGKTClient(EdgeMLP, _partition().with_format("torch"), epochs=0, transform=shift)
    calls.clear()  # the check at construction read one item
    # Execute
    unshifted_arrays, arrays = _uploaded(plain), _uploaded(shifted)
    # Assert: the features are those of the shifted images, not of the images
    expected = _features_of(torch.as_tensor(_pixels()) + 5.0)
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(arrays["features"], unshifted_arrays["features"])
    assert len(calls) == N  # one round of 0 epochs: one extraction


def test_a_transform_is_applied_to_tuple_items_too() -> None:
    # Prepare
    items = [(torch.as_tensor(x), y) for x, y in zip(_pixels(), _labels(), strict=True)]
    client = FedGKTClient(EdgeMLP, items, epochs=0, transform=lambda image: image * -1.0)
    # Execute
    arrays = _uploaded(client)
    # Assert
    expected = _features_of(-torch.as_tensor(_pixels()))
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)


def test_a_partition_with_its_own_transform_is_read() -> None:
    # Prepare: as Flower's quickstart does, a batch transform on the partition
    def apply_transforms(batch: dict) -> dict:
        batch["img"] = [torch.tensor(image) * 2.0 for image in batch["img"]]
        return batch

    partition = _partition().with_transform(apply_transforms)
    client = FedGKTClient(EdgeMLP, partition, epochs=0)
    # Execute
    arrays = _uploaded(client)
    # Assert
    expected = _features_of(torch.as_tensor(_pixels()) * 2.0)
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)


class GreyMLP(EdgeMLP):
    """EdgeMLP on 2x2 grey images (1 x 2 x 2 tensors)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward(x.flatten(1))


def test_pil_images_become_tensors_in_0_1() -> None:
    # Prepare: 2x2 grey PIL images
    pixels = np.arange(N * 4, dtype=np.uint8).reshape(N, 2, 2) * 6
    items = [{"image": Image.fromarray(p, mode="L"), "label": 1} for p in pixels]
    client = FedGKTClient(GreyMLP, items, epochs=0)
    # Execute
    arrays = _uploaded(client)
    # Assert
    expected = _features_of(torch.as_tensor(pixels.reshape(N, 4), dtype=torch.float32) / 255)
    np.testing.assert_allclose(arrays["features"], expected, rtol=1e-5, atol=1e-6)


# -- what cannot work is named when the client is built -----------------------------
def test_items_that_are_bare_tensors_are_named() -> None:
    with pytest.raises(ValueError, match=r"train_data: item 0 .* Tensor.*\(x, y\).*image_key"):
        FedGKTClient(EdgeMLP, [torch.zeros(4)] * 3)


def test_a_dict_without_the_image_key_names_its_keys_and_the_arguments() -> None:
    # Prepare
    partition = Dataset.from_dict({"pixels": _pixels().tolist(), "label": _labels()})
    # Execute / Assert
    with pytest.raises(ValueError) as caught:
        FedGKTClient(EdgeMLP, partition)
    message = str(caught.value)
    assert "['label', 'pixels']" in message and "image_key='img'" in message
    assert "label_key=" in message


def test_a_dict_without_the_label_key_names_it() -> None:
    partition = Dataset.from_dict({"img": _pixels().tolist(), "fine_label": _labels()})
    with pytest.raises(ValueError, match=r"\['fine_label', 'img'\].*label_key='label'"):
        FedGKTClient(EdgeMLP, partition)


@pytest.mark.parametrize("label", [1.5, "cat", [0, 1, 0]], ids=["float", "text", "one-hot"])
def test_a_label_that_is_not_an_integer_is_named(label) -> None:
    items = [{"img": torch.zeros(4), "label": label}] * 3
    with pytest.raises(ValueError, match=r"train_data: item 0 .*label.*one integer"):
        FedGKTClient(EdgeMLP, items)


def test_an_image_the_model_cannot_take_is_named_with_its_shape() -> None:
    # Prepare: images of 5 values for a model on 4
    partition = Dataset.from_dict({"img": [[0.0] * 5] * 3, "label": [0, 1, 2]})
    # Execute / Assert: the image's shape and the model's own error
    with pytest.raises(ValueError, match=r"cannot take train_data's images \(shape 5, .*mat1"):
        FedGKTClient(EdgeMLP, partition)


def test_a_bad_test_split_is_named_as_such() -> None:
    with pytest.raises(ValueError, match=r"cannot take test_data's images \(shape 2x2"):
        FedGKTClient(EdgeMLP, _partition(), [(torch.zeros(2, 2), 0)])


class LogitsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def test_a_model_that_does_not_return_logits_and_features_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"must return \(logits, features\).*one tensor of shape 1x3"
    ):
        FedGKTClient(LogitsOnly, _partition())


def test_a_sample_set_takes_no_transform() -> None:
    data = SampleSet(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.arange(3))
    with pytest.raises(ValueError, match="SampleSet.*transform"):
        FedGKTClient(EdgeMLP, data, transform=lambda image: image)


def test_building_a_client_leaves_the_global_rng_as_it_was() -> None:
    # Prepare: a model that seeds the global RNG when built, and a random transform
    before = torch.random.get_rng_state()
    # Execute
    partition = _partition().with_format("torch")
    FedGKTClient(EdgeMLP, partition, transform=lambda image: image + torch.rand(4))
    # Assert
    assert torch.equal(torch.random.get_rng_state(), before)


# -- the node checks its features against the server's feature-shape ---------------
def test_features_of_another_shape_than_the_server_takes_are_refused() -> None:
    # Prepare
    client = FedGKTClient(EdgeMLP, _partition(), _partition(), epochs=0)
    # Execute / Assert: both shapes are named
    with pytest.raises(ValueError, match=r"features are 6; the server takes 16x4x4: cut"):
        client.train(_message(1, **{"feature-shape": "16x4x4"}), _context())
    with pytest.raises(ValueError, match=r"features are 6; the server takes 7"):
        client.evaluate(_message(1, **{"feature-shape": "7"}), _context())


def test_features_of_the_shape_the_server_takes_are_sent() -> None:
    # Prepare: the round config a server that takes 6 features sends
    engine = RoundEngine(nn.Linear(WIDTH, CLASSES), feature_shape=(WIDTH,))
    config = {k: v for k, v in engine.round_config(1).items() if k != "server-round"}
    client = FedGKTClient(EdgeMLP, _partition(), _partition(), epochs=0)
    # Execute
    arrays = _uploaded(client, **config)
    # Assert
    assert config["feature-shape"] == "6"
    assert arrays["ids"].shape == (N,)


def test_the_feature_shape_is_read_from_the_round_config() -> None:
    assert RoundInstructions.from_config({"feature-shape": "16x32x32"}).feature_shape == (
        16,
        32,
        32,
    )
    assert RoundInstructions.from_config({"feature-shape": "6"}).feature_shape == (6,)
    assert RoundInstructions.from_config({}).feature_shape is None  # older servers
    with pytest.raises(ValueError, match="feature-shape '16 by 32'"):
        RoundInstructions.from_config({"feature-shape": "16 by 32"})
