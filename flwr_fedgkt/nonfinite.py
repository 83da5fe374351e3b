"""Non-finite steps in server training: telling them apart, undoing what they
touched and finding the nodes whose features cause them.

A step whose loss or gradients are not finite is never taken: its gradients are
cleared and the model's buffers (its BatchNorm statistics) put back as they were
(:func:`saved_buffers`, :func:`restore_buffers`). The nodes of its batch are then
checked one by one (:func:`culprits`), and the samples of a node whose samples
alone fail are left out of the rest of the training (:func:`without`).

This module imports no Flower code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .codec import NodeKey
from .store import Batch

__all__ = [
    "CULPRIT_REASON",
    "gradients_finite",
    "saved_buffers",
    "restore_buffers",
    "culprits",
    "without",
]

CULPRIT_REASON = "its features give a non-finite loss or gradient in server training"
"""Why :func:`culprits` names a node."""


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor (a non-finite entry gives a non-finite norm)."""
    if hasattr(torch, "_foreach_norm"):  # one fused call where torch has it
        return list(torch._foreach_norm(tensors))
    return [t.norm() for t in tensors]


def gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient in ``model``'s ``.grad`` is finite (True with none)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(_norms(grads))).all())


def saved_buffers(model: nn.Module) -> list[Tensor]:
    """A copy of the model's buffers (its BatchNorm statistics)."""
    return [b.detach().clone() for b in model.buffers()]


@torch.no_grad()
def restore_buffers(model: nn.Module, saved: list[Tensor]) -> None:
    """Put back the buffers :func:`saved_buffers` copied."""
    for buffer, copy in zip(model.buffers(), saved, strict=True):
        buffer.copy_(copy)


def culprits(
    batch: Batch,
    fails: Callable[[Batch], bool],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[NodeKey, str]:
    """The nodes of ``batch`` whose samples alone fail, with the reason.

    Parameters
    ----------
    batch : Batch
        The batch of a step that was not finite.
    fails : Callable[[Batch], bool]
        A forward and backward pass over one node's rows of ``batch`` (a node
        with one row gets it twice: BatchNorm needs two samples); True when its
        loss or a gradient is not finite.
    model : nn.Module
        The model ``fails`` runs: its gradients are cleared and its buffers put
        back afterwards (the checks' BatchNorm statistics are not training's).
    optimizer : torch.optim.Optimizer
        The model's optimizer (it clears the gradients); nothing is updated.
    """
    found: dict[NodeKey, str] = {}
    buffers = saved_buffers(model)
    owners = np.asarray(batch.owners, dtype=object)
    for node in dict.fromkeys(batch.owners):
        rows = torch.from_numpy(np.flatnonzero(owners == node))
        if len(rows) == 1:  # BatchNorm needs two samples: check the row twice
            rows = torch.cat([rows, rows])
        part = Batch(
            batch.features[rows],
            batch.labels[rows],
            batch.edge_logits[rows],
            [node] * len(rows),
        )
        if fails(part):
            found[node] = CULPRIT_REASON
    optimizer.zero_grad(set_to_none=True)
    restore_buffers(model, buffers)
    return found


def without(batch: Batch, excluded: Mapping[NodeKey, str]) -> Batch:
    """``batch`` without the rows of the ``excluded`` nodes."""
    keep = [i for i, owner in enumerate(batch.owners) if owner not in excluded]
    if len(keep) == len(batch.owners):
        return batch
    index = torch.tensor(keep, dtype=torch.long)
    return Batch(
        batch.features[index],
        batch.labels[index],
        batch.edge_logits[index],
        [batch.owners[i] for i in keep],
    )
