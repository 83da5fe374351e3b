import mmap

import numpy as np
import pytest
import torch
from flwr.app import Array

from flwr_fedgkt.codec import FEATURE_DTYPES, PayloadError, decode_features, encode_features
from flwr_fedgkt.records import arrays_record, record_arrays
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation import validate_payload

SHAPE = (16, 4, 4)


def _features(n: int = 6) -> torch.Tensor:
    return torch.relu(torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2)


def _arrays(dtype: str = "float32", n: int = 6, num_classes: int = 10) -> dict[str, np.ndarray]:
    arrays = encode_features(_features(n), dtype).arrays()
    arrays["logits"] = np.zeros((n, num_classes), dtype=np.float32)
    arrays["labels"] = np.arange(n, dtype=np.int64) % num_classes
    arrays["ids"] = np.arange(100, 100 + n, dtype=np.int64)
    return arrays


@pytest.mark.parametrize(
    "dtype, bytes_per_value, tolerance",
    [("float32", 4, 0.0), ("float16", 2, 2**-10), ("bfloat16", 2, 2**-7), ("int8", 1, None)],
)
def test_codec_round_trip_within_its_bound(dtype, bytes_per_value, tolerance) -> None:
    x = _features()
    enc = encode_features(x, dtype)
    back = decode_features(enc)
    assert enc.data.nbytes == x.numel() * bytes_per_value
    if dtype == "int8":
        # half a quantisation step per channel
        step = torch.from_numpy(enc.scale).view(1, -1, 1, 1)
        assert ((back - x).abs() <= step / 2 + 1e-6).all()
    else:
        assert torch.allclose(back, x, rtol=tolerance, atol=1e-6)


def test_valid_payload_is_accepted_for_every_dtype() -> None:
    for dtype in FEATURE_DTYPES:
        payload = validate_payload(_arrays(dtype), dtype, SHAPE, 10)
        assert payload.num_samples == 6


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("logits"), "missing arrays: logits"),
        (lambda a: a.update(features=a["features"][:, :8]), "shape"),
        (lambda a: a.update(features=a["features"].astype(np.float64)), "dtype"),
        (lambda a: a["features"].__setitem__((0, 0, 0, 0), np.nan), "NaN or Inf"),
        (lambda a: a["logits"].__setitem__((1, 1), np.inf), "logits contain NaN"),
        (lambda a: a["labels"].__setitem__(0, 10), "labels out of range"),
        (lambda a: a.update(ids=a["ids"][:-1]), "ids have shape"),
        (lambda a: a["ids"].__setitem__(1, 100), "duplicate sample ids"),
        (lambda a: a["ids"].__setitem__(1, -5), "negative sample id"),
        (lambda a: a.update(labels=a["labels"].astype(np.float32)), "integer dtype"),
    ],
)
def test_malformed_payload_is_rejected_with_a_reason(mutate, message) -> None:
    arrays = _arrays()
    mutate(arrays)
    with pytest.raises(PayloadError, match=message):
        validate_payload(arrays, "float32", SHAPE, 10)


def test_store_batches_shuffle_across_nodes_and_keep_rows_together() -> None:
    # Prepare: two nodes; each sample's feature value equals its label
    store = FeatureStore()
    for node, labels in ((1, [0, 1, 2, 3]), (2, [4, 5, 6])):
        n = len(labels)
        feats = torch.tensor(labels, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *SHAPE)
        arrays = encode_features(feats.contiguous(), "float16").arrays()
        arrays.update(
            logits=np.tile(np.array(labels, dtype=np.float32)[:, None], (1, 10)),
            labels=np.array(labels, dtype=np.int64),
            ids=np.arange(n, dtype=np.int64),
        )
        store.put(node, validate_payload(arrays, "float16", SHAPE, 10), server_round=1)
    # Execute
    batches = list(store.batches(3, torch.Generator().manual_seed(0)))
    # Assert
    labels = torch.cat([b[1] for b in batches])
    assert sorted(labels.tolist()) == list(range(7))
    assert labels.tolist() != list(range(7))  # shuffled, not node after node
    for feats, labs, logits, owners in batches:
        assert owners == [1 if label < 4 else 2 for label in labs.tolist()]
        assert feats.dtype == torch.float32
        assert torch.equal(feats[:, 0, 0, 0], labs.float())
        assert torch.equal(logits[:, 0], labs.float())
    assert store.num_samples == 7
    assert store.nbytes > 0


def _filled_store(store: FeatureStore, dtype: str = "int8") -> FeatureStore:
    for node, first_id in ((3, 0), (1, 100)):
        arrays = _arrays(dtype, n=10)
        arrays["ids"] = np.arange(first_id, first_id + 10, dtype=np.int64)
        store.put(node, validate_payload(arrays, dtype, SHAPE, 10), server_round=1)
    return store


def test_disk_store_trains_exactly_like_the_memory_store(tmp_path) -> None:
    from flwr_fedgkt.server import ServerTrainer

    # Prepare
    memory = _filled_store(FeatureStore())
    disk = _filled_store(FeatureStore(tmp_path / "store"))
    trainers = [ServerTrainer(10, batch_size=4, seed=5, device="cpu") for _ in range(2)]
    # Execute
    results = [t.train(store, epochs=2) for t, store in zip(trainers, (memory, disk), strict=True)]
    # Assert
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "node-1-2-round-1.npy",
        "node-1-2-round-1.npz",
        "node-3-1-round-1.npy",
        "node-3-1-round-1.npz",
    ]
    assert isinstance(_buffer(disk.payload(1).features.data), mmap.mmap)
    assert results[0].loss == results[1].loss
    for a, b in zip(
        trainers[0].model.state_dict().values(),
        trainers[1].model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_disk_store_replaces_a_nodes_file_on_a_new_upload(tmp_path) -> None:
    store = _filled_store(FeatureStore(tmp_path))
    arrays = _arrays("int8", n=4)
    store.put(3, validate_payload(arrays, "int8", SHAPE, 10), server_round=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node-1-2-round-1.npy",
        "node-1-2-round-1.npz",
        "node-3-3-round-2.npy",
        "node-3-3-round-2.npz",
    ]
    assert store.node_features(3).shape == (4, *SHAPE)
    store.remove(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node-3-3-round-2.npy",
        "node-3-3-round-2.npz",
    ]


def _buffer(array: np.ndarray) -> object:
    """The object that finally holds an array's memory."""
    base: object = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_features_are_read_from_a_record_without_a_copy(dtype) -> None:
    # Prepare
    record = arrays_record(_arrays(dtype))
    # Execute
    arrays = record_arrays(record, views=("features",))
    # Assert: the same values, read-only, in the record's own bytes
    expected = record["features"].numpy()
    assert arrays["features"].dtype == expected.dtype
    assert np.array_equal(arrays["features"], expected)
    assert not arrays["features"].flags.writeable
    assert _buffer(arrays["features"]) is record["features"].data
    assert arrays["labels"].flags.writeable  # the small arrays are copies
    # and a payload over the view decodes like one over a copy
    payload = validate_payload(arrays, dtype, SHAPE, 10)
    copied = validate_payload(record_arrays(record), dtype, SHAPE, 10)
    assert torch.equal(decode_features(payload.features), decode_features(copied.features))


def test_a_view_of_bytes_that_are_not_an_array_is_refused() -> None:
    from flwr_fedgkt.records import array_view

    good = Array(np.arange(6, dtype=np.float32))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError, match="does not match"):
        array_view(truncated)
    with pytest.raises(ValueError):
        array_view(Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"junk"))


def test_disk_store_reads_rows_back_after_releasing_its_pages(tmp_path) -> None:
    memory = _filled_store(FeatureStore())
    disk = _filled_store(FeatureStore(tmp_path))
    for _ in range(2):  # the second read comes after the pages were released
        for node in (1, 3):
            assert torch.equal(disk.node_features(node), memory.node_features(node))
