"""The disk feature store across a server restart: every stored upload is found
again (features, logits, labels, ids, int8 scales), files of a round the
checkpoint does not hold are deleted, and a replaced upload's files stay while a
kept checkpoint may name them."""

import numpy as np
import torch

from flwr_fedgkt.codec import FeaturePayload, encode_features
from flwr_fedgkt.store import FeatureStore


def _payload(first_id: int, n: int = 6, seed: int = 0) -> FeaturePayload:
    gen = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(n, 4, 2, 2, generator=gen))
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    return FeaturePayload(
        encode_features(features, "int8"),
        torch.randn(n, 3, generator=gen).numpy(),
        (ids % 3).astype(np.int64),
        ids,
    )


def _rows(store: FeatureStore, key: str) -> tuple:
    payload = store.payload(key)
    return store.node_features(key), payload.logits, payload.labels, payload.ids


def test_a_restarted_store_finds_the_checkpointed_uploads_and_drops_newer_files(tmp_path) -> None:
    # Prepare: two nodes stored in round 1, checkpointed; then round 2 stores one
    store = FeatureStore(tmp_path)
    store.keep_retired = True
    store.put("a", _payload(0), 1)
    store.put("b", _payload(100, seed=1), 1)
    state = store.state_dict()
    store.checkpointed()
    expected = {key: _rows(store, key) for key in ("a", "b")}
    store.put("a", _payload(0, seed=2), 2)  # after the checkpoint: the server dies
    # Execute: a new server's store, from the checkpoint
    restarted = FeatureStore(tmp_path)
    restarted.load_state_dict(state)
    # Assert: round 1's uploads, exactly, and nothing of round 2 on disk
    assert restarted.nodes() == ["a", "b"] and restarted.last_round("a") == 1
    for key, rows in expected.items():
        for got, want in zip(_rows(restarted, key), rows, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not list(tmp_path.glob("*round-2*")), sorted(p.name for p in tmp_path.iterdir())
    assert len(list(tmp_path.glob("node-*"))) == 4  # a and b: features and the rest


def test_replaced_files_stay_until_no_kept_checkpoint_names_them(tmp_path) -> None:
    # Prepare
    store = FeatureStore(tmp_path)
    store.keep_retired = True
    store.put("a", _payload(0), 1)
    first = {p.name for p in tmp_path.glob("node-*")}
    store.checkpointed()  # checkpoint 1 names round 1's files
    # Execute / Assert: replaced in round 2, the files stay for checkpoint 1 ...
    store.put("a", _payload(0, seed=3), 2)
    store.checkpointed()  # checkpoints 1 and 2 are kept
    assert first <= {p.name for p in tmp_path.glob("node-*")}
    # ... and go once checkpoint 1 is no longer kept
    store.put("a", _payload(0, seed=4), 3)
    store.checkpointed()  # checkpoints 2 and 3 are kept
    assert not first & {p.name for p in tmp_path.glob("node-*")}
    assert len(list(tmp_path.glob("node-*"))) == 4  # rounds 2 and 3


def test_without_checkpoints_a_replaced_upload_is_deleted_at_once(tmp_path) -> None:
    store = FeatureStore(tmp_path)
    store.put("a", _payload(0), 1)
    store.put("a", _payload(0, seed=5), 2)
    assert sorted(p.name.split(".")[0] for p in tmp_path.glob("node-*")) == [
        "node-a-2-round-2",
        "node-a-2-round-2",
    ]
