"""What the algorithms cost: parameters, FLOPs and bytes on the wire, measured.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` on one real
forward (and backward) pass; a multiply-add counts as two FLOPs.

Bytes on the wire are counted from the messages actually sent: the sum of
``ArrayRecord.count_bytes()`` over a message's ArrayRecords (the array buffers and
their keys, as Flower counts them), recorded per round, per node, per direction
(``down``: server to node, ``up``: node to server) and per phase (``train``,
``evaluate``) in a :class:`ByteLedger`.

This module imports no Flower code: it reads records through the small protocol
they share (``content.array_records`` mapping to objects with ``count_bytes()``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .models import build_model, count_parameters, feature_shape_of, is_server_model

__all__ = [
    "input_shape",
    "count_flops",
    "model_profile",
    "content_bytes",
    "ByteLedger",
    "DIRECTIONS",
    "PHASES",
    "edge_round_flops",
]


def input_shape(name: str) -> tuple[int, int, int]:
    """Per-sample input shape: features for server models, images otherwise."""
    if is_server_model(name):
        return feature_shape_of(name)
    return (3, 32, 32)


def count_flops(model: nn.Module, shape: tuple[int, ...], batch: int = 2) -> tuple[float, float]:
    """``(forward, forward + backward)`` FLOPs per sample of ``model`` on ``shape``.

    The input is created on the model's device; a model on the ``meta`` device is
    counted without computing anything (the same counts, much faster).
    """
    model = model.train()
    device = next(model.parameters()).device
    x = torch.randn(batch, *shape, device=device)
    with FlopCounterMode(display=False) as forward_counter:
        out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    with FlopCounterMode(display=False) as backward_counter:
        logits.sum().backward()
    model.zero_grad(set_to_none=True)
    forward = forward_counter.get_total_flops() / batch
    backward = backward_counter.get_total_flops() / batch
    return forward, forward + backward


@lru_cache(maxsize=16)
def _profile(name: str, num_classes: int) -> tuple[int, float, float]:
    with torch.device("meta"):  # shapes only: FLOPs and parameters need no values
        model = build_model(name, num_classes)
    forward, train = count_flops(model, input_shape(name))
    return count_parameters(model), forward, train


def model_profile(name: str, num_classes: int = 10) -> dict[str, Any]:
    """Name, parameters and FLOPs per sample (inference and training) of a model."""
    params, forward, train = _profile(name, num_classes)
    return {
        "name": name,
        "params": params,
        "forward_flops_per_sample": forward,
        "train_flops_per_sample": train,
    }


# -- bytes on the wire -------------------------------------------------------------


class _CountsBytes(Protocol):
    def count_bytes(self) -> int: ...


class _HasArrayRecords(Protocol):
    @property
    def array_records(self) -> Mapping[str, _CountsBytes]: ...


def content_bytes(content: _HasArrayRecords) -> int:
    """Bytes of all ArrayRecords in a message's content (a ``RecordDict``).

    The sum of ``ArrayRecord.count_bytes()``: the serialised arrays and their keys.
    ConfigRecords and MetricRecords (a few bytes of settings and scores) are not
    counted, for either algorithm.
    """
    return int(sum(record.count_bytes() for record in content.array_records.values()))


DIRECTIONS = ("down", "up")
"""``down``: server to node; ``up``: node to server."""

PHASES = ("train", "evaluate")


class ByteLedger:
    """Bytes sent per round, per node, per direction and per phase.

    A strategy calls :meth:`add` for every message it sends (``down``) and every
    reply it receives (``up``), with :func:`content_bytes` of its content; the
    ledger sums them. A node that was sent nothing in a phase simply has no entry.
    """

    def __init__(self) -> None:
        # round -> node -> (direction, phase) -> bytes
        self._bytes: dict[int, dict[int, dict[tuple[str, str], int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )

    def add(self, server_round: int, node_id: int, direction: str, phase: str, nbytes: int) -> None:
        """Record ``nbytes`` sent in ``direction`` to/from ``node_id`` in ``phase``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if nbytes < 0:
            raise ValueError(f"a message cannot carry {nbytes} bytes")
        self._bytes[server_round][node_id][(direction, phase)] += int(nbytes)

    def add_content(
        self, server_round: int, node_id: int, direction: str, phase: str, content: Any
    ) -> int:
        """Record the ArrayRecord bytes of a message's ``content``; return them."""
        nbytes = content_bytes(content)
        self.add(server_round, node_id, direction, phase, nbytes)
        return nbytes

    def rounds(self) -> list[int]:
        return sorted(self._bytes)

    def nodes(self, server_round: int) -> list[int]:
        return sorted(self._bytes.get(server_round, {}))

    @staticmethod
    def _fields(counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
        fields: dict[str, int] = {}
        for direction in DIRECTIONS:
            for phase in PHASES:
                fields[f"bytes_{direction}_{phase}"] = int(counts.get((direction, phase), 0))
            fields[f"bytes_{direction}"] = sum(fields[f"bytes_{direction}_{p}"] for p in PHASES)
        return fields

    def node_totals(self, server_round: int, node_id: int) -> dict[str, int]:
        """``bytes_up``, ``bytes_down`` and their ``_train`` / ``_evaluate`` parts."""
        return self._fields(self._bytes.get(server_round, {}).get(node_id, {}))

    def round_totals(self, server_round: int) -> dict[str, int]:
        """The same fields summed over all nodes of the round."""
        total: dict[tuple[str, str], int] = defaultdict(int)
        for counts in self._bytes.get(server_round, {}).values():
            for key, value in counts.items():
                total[key] += value
        return self._fields(total)

    def per_client(self, server_round: int) -> list[dict[str, int]]:
        """One entry per node of the round: ``node_id`` and :meth:`node_totals`."""
        return [
            {"node_id": node, **self.node_totals(server_round, node)}
            for node in self.nodes(server_round)
        ]


# -- edge compute ------------------------------------------------------------------


def edge_round_flops(
    profile: Mapping[str, Any],
    train_samples: int,
    epochs: int,
    forward_samples: Iterable[int] = (),
) -> float:
    """FLOPs the edge spends in one round, summed over the nodes.

    Parameters
    ----------
    profile : Mapping[str, Any]
        The edge model's :func:`model_profile`.
    train_samples : int
        Training samples over all nodes in the round.
    epochs : int
        Local epochs per round.
    forward_samples : Iterable[int] (default: ())
        Further inference-only passes, in samples (FedGKT: its feature extraction
        over the training split and over the test split; FedAvg: evaluation).

    Returns
    -------
    float
        ``epochs * train_samples * train FLOPs per sample + sum(forward_samples) *
        forward FLOPs per sample``.
    """
    train = float(profile["train_flops_per_sample"]) * epochs * train_samples
    forward = float(profile["forward_flops_per_sample"]) * sum(forward_samples)
    return train + forward
