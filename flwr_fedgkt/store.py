"""The feature store: every node's newest upload, in memory or memory-mapped on disk.

This module imports no Flower code.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .codec import EncodedFeatures, FeaturePayload, NodeKey, read_npy_header, widen
from .files import write_atomic

__all__ = ["Batch", "FeatureStore", "file_label"]


@dataclass
class _Entry:
    payload: FeaturePayload  # its features.data is in memory or memory-mapped
    round: int
    scale: Tensor | None = field(default=None, repr=False)
    offset: Tensor | None = field(default=None, repr=False)
    path: Path | None = None
    mapping: mmap.mmap | None = field(default=None, repr=False)

    def rows(self, index: np.ndarray) -> Tensor:
        """Rows ``index`` of the features, widened to float32 (reads only those rows)."""
        enc = self.payload.features
        data = torch.from_numpy(np.ascontiguousarray(enc.data[index]))  # a copy
        if self.mapping is not None and _MADV_DONTNEED is not None:
            # the rows are copied: unmap the file's pages from this process, so the
            # store's resident memory stays flat however large it grows (the data
            # stays in the OS page cache, which the OS can reclaim)
            self.mapping.madvise(_MADV_DONTNEED)
        return widen(data, enc.dtype, self.scale, self.offset)


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def _entry(
    payload: FeaturePayload, server_round: int, path: Path | None, mapping: mmap.mmap | None
) -> _Entry:
    enc = payload.features
    return _Entry(
        payload=payload,
        round=server_round,
        scale=None if enc.scale is None else torch.from_numpy(np.array(enc.scale)),
        offset=None if enc.offset is None else torch.from_numpy(np.array(enc.offset)),
        path=path,
        mapping=mapping,
    )


def _sidecar(path: Path) -> Path:
    """The ``.npz`` beside a stored upload's features file."""
    return path.with_suffix(".npz")


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap]:
    """A read-only memory map of the ``.npy`` file at ``path`` and the array over it."""
    with open(path, "rb") as file:
        header = read_npy_header(file)
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return header.view(mapping), mapping


def file_label(key: NodeKey) -> str:
    """A node key as a file-name part: itself when it is short and made of letters,
    digits, ``_`` and ``-``, else ``key-`` and a digest of it (no two keys share
    one)."""
    text = str(key)
    if 0 < len(text) <= 40 and all(c.isascii() and (c.isalnum() or c in "_-") for c in text):
        return text
    return "key-" + hashlib.sha256(text.encode()).hexdigest()[:24]


class Batch(NamedTuple):
    """One training batch of the store: float32 features, labels, the edge logits
    (KD targets) and, per row, the key of the node that uploaded it."""

    features: Tensor
    labels: Tensor
    edge_logits: Tensor
    owners: list[NodeKey]


class FeatureStore:
    """Features of every node, in their wire dtype, keyed by node key.

    A node's newer upload replaces its older one. Keys are the nodes' stable keys
    (strings chosen by the nodes); file names on disk never contain them. With
    ``directory`` set the features live in memory-mapped ``.npy`` files there and
    the rest of each upload (logits, labels, ids, int8 scales) in a ``.npz`` file
    beside them, so a federation whose features exceed RAM still trains (batches
    read just their rows) and a restarted server finds every stored node again
    (:meth:`state_dict` / :meth:`load_state_dict`). Without it they stay in memory
    and a checkpoint holds none of them.

    With checkpoints (``keep_retired``), the files of a replaced or dropped upload
    are deleted only once no kept checkpoint names them (:meth:`checkpointed`).

    Parameters
    ----------
    directory : str | Path | None (default: None)
        Folder for the stored uploads; ``None`` keeps them in memory.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[NodeKey, _Entry] = {}
        self._files = 0  # a counter for file names
        self.keep_retired = False
        self._retired: list[tuple[int, Path]] = []  # (checkpoints written by then, file)
        self._checkpoints = 0

    def put(self, node: NodeKey, payload: FeaturePayload, server_round: int) -> bool:
        """Store ``node``'s upload of ``server_round``, replacing its older one.

        A payload that reuses the stored features (:func:`validate_update`) only
        refreshes the node's logits and round (on disk: a new small ``.npz``, the
        features file linked under a new name); the features are not copied.
        Returns True in that case, False when new features were stored.
        """
        current = self._entries.get(node)
        if current is not None and payload.features is current.payload.features:
            current.payload = payload
            current.round = server_round
            if current.path is not None:
                current.path = self._relink(node, current.path, server_round)
                self._write_sidecar(current.path, payload)
            return True
        enc = payload.features
        path, mapping = None, None
        if self.directory is not None:
            path = self._new_path(node, server_round)
            write_atomic(path, lambda handle: np.save(handle, np.ascontiguousarray(enc.data)))
            self._write_sidecar(path, payload)
            mapped, mapping = _map_npy(path)
            payload = FeaturePayload(
                EncodedFeatures(enc.dtype, mapped, enc.scale, enc.offset),
                payload.logits,
                payload.labels,
                payload.ids,
            )
        self.remove(node)
        self._entries[node] = _entry(payload, server_round, path, mapping)
        return False

    def _new_path(self, node: NodeKey, server_round: int) -> Path:
        assert self.directory is not None
        self._files += 1
        return self.directory / f"node-{file_label(node)}-{self._files}-round-{server_round}.npy"

    def _relink(self, node: NodeKey, path: Path, server_round: int) -> Path:
        """The features file under a new name (a hard link, no copy), the old names
        retired: a kept checkpoint may still name them."""
        fresh = self._new_path(node, server_round)
        os.link(path, fresh)
        self._retire(path)
        self._retire(_sidecar(path))
        return fresh

    @staticmethod
    def _write_sidecar(path: Path, payload: FeaturePayload) -> None:
        """Everything of ``payload`` but the features, in the ``.npz`` beside ``path``."""
        enc = payload.features
        arrays = {
            "logits": payload.logits,
            "labels": payload.labels,
            "ids": payload.ids,
            "dtype": np.array(enc.dtype),
        }
        if enc.scale is not None and enc.offset is not None:
            arrays.update(scale=np.asarray(enc.scale), offset=np.asarray(enc.offset))
        write_atomic(_sidecar(path), lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]

    def _retire(self, path: Path) -> None:
        if self.keep_retired:
            self._retired.append((self._checkpoints, path))
        else:
            path.unlink(missing_ok=True)

    def checkpointed(self) -> None:
        """A checkpoint naming the current uploads was written: delete the files of
        uploads replaced or dropped before the previous checkpoint was written (of
        the checkpoints, the newest two are kept; neither names those)."""
        self._checkpoints += 1
        keep = []
        for written, path in self._retired:
            if written <= self._checkpoints - 2:
                path.unlink(missing_ok=True)
            else:
                keep.append((written, path))
        self._retired = keep

    def state_dict(self) -> dict[str, Any] | None:
        """Where each stored node's upload is (disk store), for a checkpoint; None
        for the memory store, whose uploads a checkpoint does not hold."""
        if self.directory is None:
            return None
        return {
            "entries": {
                key: {"path": str(entry.path), "round": entry.round}
                for key, entry in self._entries.items()
            },
            "files": self._files,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Find the uploads a checkpoint names again, and delete the files in the
        directory it does not name (uploads of a round the checkpoint does not
        hold). The memory store reads the named uploads in."""
        if not state:
            return
        for key in list(self._entries):
            self.remove(key)
        named: set[Path] = set()
        for key, where in state["entries"].items():
            path = Path(where["path"])
            named.update((path.resolve(), _sidecar(path).resolve()))
            with np.load(_sidecar(path)) as side:
                extra = {k: side[k] for k in side.files}
            mapping = None
            if self.directory is None:
                data: np.ndarray = np.load(path)
            else:
                data, mapping = _map_npy(path)
            features = EncodedFeatures(
                str(extra["dtype"]), data, extra.get("scale"), extra.get("offset")
            )
            payload = FeaturePayload(features, extra["logits"], extra["labels"], extra["ids"])
            self._entries[str(key)] = _entry(payload, int(where["round"]), path, mapping)
        if self.directory is not None:
            self._files = max(self._files, int(state.get("files", 0)))
            for path in self.directory.glob("node-*-round-*.np[yz]"):
                if path.resolve() not in named:
                    path.unlink(missing_ok=True)

    def remove(self, node: NodeKey) -> None:
        entry = self._entries.pop(node, None)
        if entry is not None and entry.path is not None:
            self._retire(entry.path)
            self._retire(_sidecar(entry.path))

    def __contains__(self, node: object) -> bool:
        return node in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def nodes(self) -> list[NodeKey]:
        return sorted(self._entries)

    def payload(self, node: NodeKey) -> FeaturePayload:
        return self._entries[node].payload

    def last_round(self, node: NodeKey) -> int:
        return self._entries[node].round

    @property
    def num_samples(self) -> int:
        return sum(e.payload.num_samples for e in self._entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes held at rest (features in wire dtype plus logits, labels, ids)."""
        return sum(e.payload.nbytes for e in self._entries.values())

    def node_features(self, node: NodeKey) -> Tensor:
        """All of one node's features, widened to float32."""
        entry = self._entries[node]
        return entry.rows(np.arange(entry.payload.num_samples))

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        nodes: list[NodeKey] | None = None,
    ) -> Iterator[Batch]:
        """Yield batches (:class:`Batch`) over the nodes' samples.

        Samples are shuffled across all nodes when ``generator`` is given (in a
        fixed order otherwise); features are widened to float32 one batch at a time.
        """
        keys = self.nodes() if nodes is None else list(nodes)
        # Order nodes by their smallest sample id, which is stable across runs (node
        # ids are not), so that a seeded run shuffles the same way every time.
        keys.sort(key=lambda k: (int(self._entries[k].payload.ids.min()), k))
        entries = [self._entries[k] for k in keys]
        sizes = torch.tensor([e.payload.num_samples for e in entries], dtype=torch.long)
        if len(entries) == 0:
            return
        offsets = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        order = (
            torch.randperm(total, generator=generator)
            if generator is not None
            else torch.arange(total)
        )
        labels = [torch.from_numpy(e.payload.labels) for e in entries]
        logits = [torch.from_numpy(e.payload.logits) for e in entries]
        for start in range(0, total, batch_size):
            idx = order[start : start + batch_size]
            owner = torch.searchsorted(offsets, idx, right=True) - 1
            feats, labs, logs, positions = [], [], [], []
            for k in torch.unique(owner).tolist():
                mask = owner == k
                rows = idx[mask] - offsets[k]
                feats.append(entries[k].rows(rows.numpy()))
                labs.append(labels[k][rows])
                logs.append(logits[k][rows])
                positions.append(torch.nonzero(mask).flatten())
            # restore the shuffled order inside the batch
            inverse = torch.empty(len(idx), dtype=torch.long)
            inverse[torch.cat(positions)] = torch.arange(len(idx))
            yield Batch(
                torch.cat(feats)[inverse],
                torch.cat(labs)[inverse],
                torch.cat(logs)[inverse],
                [keys[k] for k in owner.tolist()],
            )
