"""Who is who: node keys, the Flower node ids that hold them, and sample ownership.

Flower node ids are not stable (simulated nodes get new ids in every run, a
restarted SuperNode may get a new one), so every reply names its node's **key**, a
stable string (by default the node's ``partition-id``). The server keeps what it
holds per node (stored features, server logits, last-seen round) by key, and this
registry decides whether a reply may speak for the key it names:

* a key is bound to the first public key that proves it (:mod:`flwr_fedgkt.identity`:
  trust on first use); from then on a reply under the key must prove the same
  public key, from whichever node id (a restarted SuperNode, a resumed run's new
  node ids), and an unproven one is rejected;
* a key nobody proved yet (nodes that send no proof, e.g. the legacy client) is
  bound to the first node id that sends it, and a node id to the first key it
  sends; a reply from another node id under a bound key is rejected while the
  bound node is still connected; once that node is gone, the key moves to the new
  node id (a restarted SuperNode), so its entries are replaced, not doubled;
* where the server knows each key's partition (the built-in data sets), an id
  outside the key's partition is rejected; otherwise ids are the node's own,
  namespaced by key, and no key can claim another's (no first-come ownership);
* a payload whose features are a byte-for-byte copy of another key's is rejected.

Checks (:meth:`NodeRegistry.check_binding`, :meth:`NodeRegistry.check_claims`)
change nothing; :meth:`NodeRegistry.commit`
records an accepted reply. This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codec import FeaturePayload, NodeKey, PayloadError, encoded_digest
from .sketch import sample_sketches

__all__ = ["KeyProof", "NodeRegistry", "SampleIds", "features_digest"]


@dataclass(frozen=True)
class KeyProof:
    """What a reply proves about its key: the public key it names and whether its
    signature over the message's statement is valid."""

    public: str
    valid: bool


def features_digest(payload: FeaturePayload) -> str:
    """A digest of a payload's feature bytes (and int8 code parameters)."""
    return encoded_digest(payload.features)


SampleIds = Callable[[NodeKey, str], "np.ndarray | Collection[int] | None"]
"""The sample ids of a key's partition for a split (``train`` or ``test``), or
None when the data set has no partition for the key."""


@dataclass
class _Claims:
    """The digests of one key's newest uploads, by split (``train``/``test``), and
    the sample sketches of its last :data:`SKETCH_UPLOADS` uploads."""

    digests: dict[str, str] = field(default_factory=dict)
    sketches: dict[str, list[np.ndarray]] = field(default_factory=dict)


SKETCH_UPLOADS = 3
"""How many of a key's uploads per split the near-copy check remembers."""
NEAR_COPY_SHARE = 0.5
"""A reply whose samples' sketches equal another key's for at least this share is
a near-copy. Independent uploads share almost none (measured in the tests)."""


class NodeRegistry:
    """Bindings between node keys and Flower node ids, and what each key claims.

    Parameters
    ----------
    global_sample_ids : bool (default: False)
        Sample ids are unique across all nodes (the built-in data sets).
    sample_ids : SampleIds | None (default: None)
        The sample ids each key's partition holds, by split (the built-in data
        sets: the server partitions the data set as the nodes do): an id outside
        its key's partition, or a key without one, is rejected. None: ids are the
        node's own (namespaced by key), and no key can claim another's.
    """

    def __init__(
        self, global_sample_ids: bool = False, sample_ids: SampleIds | None = None
    ) -> None:
        self.global_sample_ids = global_sample_ids
        self.sample_ids = sample_ids
        self._node_of: dict[NodeKey, int] = {}
        self._key_of: dict[int, NodeKey] = {}
        self._claims: dict[NodeKey, _Claims] = {}
        self._verifiers: dict[NodeKey, str] = {}  # key -> the public key that proved it
        self._first_seen: dict[str, int] = {}  # "<key>/<split>" -> its first upload's count

    # -- bindings --------------------------------------------------------------------
    def key_of(self, node_id: int) -> NodeKey | None:
        """The key ``node_id`` speaks for in this run, if it sent one yet."""
        return self._key_of.get(node_id)

    def node_of(self, key: NodeKey) -> int | None:
        """The node id bound to ``key``, if any."""
        return self._node_of.get(key)

    def keys(self) -> list[NodeKey]:
        return sorted(self._node_of)

    def _check_binding(
        self, key: NodeKey, node_id: int, connected: Collection[int], proof: KeyProof | None
    ) -> None:
        held = self._key_of.get(node_id)
        if held is not None and held != key:
            raise PayloadError(f"node {node_id} already speaks for node key {held!r}, not {key!r}")
        if proof is not None and not proof.valid:
            raise PayloadError(f"its proof of node key {key!r} is not a valid signature")
        verifier = self._verifiers.get(key)
        if verifier is not None:
            if proof is None:
                raise PayloadError(
                    f"node key {key!r} is proven by its node's signing key; this reply "
                    "carries no proof"
                )
            if proof.public != verifier:
                raise PayloadError(
                    f"node key {key!r} belongs to another node (proven by another signing "
                    "key; a node that lost its identity, kept in context.state and "
                    "client-state-dir, cannot take its key back in this run)"
                )
            return  # the key's own node, from whichever node id
        bound = self._node_of.get(key)
        if bound is not None and bound != node_id and bound in connected:
            raise PayloadError(
                f"node key {key!r} belongs to node {bound}, which is still connected"
            )

    # -- sample ownership ---------------------------------------------------------------
    def _check_ids(self, key: NodeKey, ids: np.ndarray, split: str) -> None:
        allowed = self.sample_ids(key, split) if self.sample_ids is not None else None
        if allowed is None:
            raise PayloadError(f"node key {key!r} names no partition of the run's data set")
        outside = np.flatnonzero(~np.isin(ids, np.asarray(allowed, dtype=np.int64)))
        if len(outside):
            shown = ", ".join(str(int(ids[i])) for i in outside[:5])
            raise PayloadError(
                f"{len(outside)} sample id(s) ({shown}{', ...' if len(outside) > 5 else ''}) "
                f"are not in node key {key!r}'s partition ({split} split)"
            )

    def first_seen(self, key: NodeKey, split: str) -> int | None:
        """The sample count of ``key``'s first accepted upload of ``split``."""
        return self._first_seen.get(f"{key}/{split}")

    def _check_copy(self, key: NodeKey, split: str, digest: str, mine: np.ndarray) -> None:
        for other, claims in self._claims.items():
            if other != key and claims.digests.get(split) == digest:
                raise PayloadError(f"its features are a copy of node key {other!r}'s")
        if not len(mine):
            return
        for other, claims in self._claims.items():
            kept = claims.sketches.get(split, [])
            if other == key or not kept:
                continue
            shared = int(np.isin(mine, np.concatenate(kept)).sum())
            if shared >= NEAR_COPY_SHARE * len(mine):
                raise PayloadError(
                    f"{shared} of its {len(mine)} samples' features nearly equal node key "
                    f"{other!r}'s (a near-copy)"
                )

    # -- the two calls the server makes ---------------------------------------------------
    def check_binding(
        self,
        key: NodeKey,
        node_id: int,
        connected: Collection[int],
        proof: KeyProof | None = None,
    ) -> None:
        """Raise PayloadError when ``node_id`` may not speak for ``key`` with
        ``proof`` (see the module docstring). Changes nothing."""
        self._check_binding(key, node_id, connected, proof)

    def check_claims(
        self,
        key: NodeKey,
        payload: FeaturePayload,
        split: str,
        digest: str | None,
        sketches: np.ndarray | None = None,
    ) -> None:
        """Raise PayloadError when ``payload`` holds ids outside its key's partition
        (with ``sample_ids``) or copies another key's features (``digest``, and
        its ``sketches``: computed here when None). Changes nothing."""
        if self.sample_ids is not None:
            self._check_ids(key, payload.ids, split)
        if digest is not None:
            mine = sample_sketches(payload) if sketches is None else sketches
            self._check_copy(key, split, digest, mine)

    def commit(
        self,
        key: NodeKey,
        node_id: int,
        payload: FeaturePayload | None = None,
        split: str = "train",
        digest: str | None = None,
        proof: KeyProof | None = None,
        sketches: np.ndarray | None = None,
    ) -> int | None:
        """Record an accepted reply: bind ``key`` to ``node_id`` (and to the public
        key of its ``proof``, when the key has none yet) and note its upload (its
        ``sketches``: computed here when None).

        Returns the node id the key was bound to before, when it moved.
        """
        if proof is not None and proof.valid:
            self._verifiers.setdefault(key, proof.public)
        previous = self._node_of.get(key)
        if previous is not None and previous != node_id:
            self._key_of.pop(previous, None)
        self._node_of[key] = node_id
        self._key_of[node_id] = key
        if payload is not None:
            claims = self._claims.setdefault(key, _Claims())
            self._first_seen.setdefault(f"{key}/{split}", payload.num_samples)
            if digest is not None:
                recent = claims.sketches.setdefault(split, [])
                recent.append(sample_sketches(payload) if sketches is None else sketches)
                del recent[:-SKETCH_UPLOADS]
                claims.digests[split] = digest
        return previous if previous != node_id else None

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "global_sample_ids": self.global_sample_ids,
            "nodes": dict(self._node_of),
            "verifiers": dict(self._verifiers),
            "claims": {k: dict(c.digests) for k, c in self._claims.items()},
            "sketches": {k: dict(c.sketches) for k, c in self._claims.items()},
            "first_seen": dict(self._first_seen),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._node_of = {str(k): int(v) for k, v in state.get("nodes", {}).items()}
        self._key_of = {v: k for k, v in self._node_of.items()}
        self._verifiers = {str(k): str(v) for k, v in state.get("verifiers", {}).items()}
        self._claims = {}
        for k, digests in state.get("claims", {}).items():
            if isinstance(digests, tuple):  # checkpoints that kept ids too
                digests = digests[1]
            self._claims[str(k)] = _Claims(dict(digests))
        for k, sketches in state.get("sketches", {}).items():
            self._claims.setdefault(str(k), _Claims()).sketches = {
                split: [np.asarray(a, dtype=np.uint64) for a in arrays]
                for split, arrays in sketches.items()
            }
        self._first_seen = {str(k): int(v) for k, v in state.get("first_seen", {}).items()}
