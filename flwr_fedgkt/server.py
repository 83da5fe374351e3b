"""What the FedGKT server does, without Flower.

The large model (ResNet-55 / ResNet-109) trains on the edge features of all clients
with ``CE + alpha * KD`` (KD against each sample's edge logits), shuffled across
clients; it then scores each client's features to give that client its server logits
for the next round.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import RunConfig
from .distill import ce_kd_loss
from .edge import resolve_device
from .features import Batch, FeatureStore, NodeKey
from .models import (
    COMPACT,
    SERVER_MODELS,
    count_parameters,
    feature_shape_of,
    seeded_model,
)
from .precision import autocast, loss_scaler, resolve_precision
from .training import (
    EpochTotals,
    LRScheduleFactory,
    OptimizerFactory,
    StepOutcome,
    make_optimizer,
    train_epochs,
)

__all__ = ["ServerTrainer", "ServerTrainResult", "NonFiniteOutput", "output_classes"]

logger = logging.getLogger("flwr.fedgkt")

PROGRESS_SECONDS = 5.0
"""A server epoch that takes longer than this gets a log line of its own."""


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor (a non-finite entry gives a non-finite norm)."""
    if hasattr(torch, "_foreach_norm"):  # one fused call where torch has it
        return list(torch._foreach_norm(tensors))
    return [t.norm() for t in tensors]


class NonFiniteOutput(ArithmeticError):
    """The server model's output on a node's features is not finite."""


def _to_device(features: Tensor, device: torch.device) -> Tensor:
    """Features on ``device``; image-like (4-D) ones channels-last. For a GPU the
    batch is copied from pinned (page-locked) memory without blocking, so the copy
    overlaps the GPU's work; on a CPU nothing is pinned or copied."""
    if device.type == "cuda":
        features = features.pin_memory()
        if features.dim() == 4:
            return features.to(device, non_blocking=True, memory_format=torch.channels_last)
        return features.to(device, non_blocking=True)
    if features.dim() == 4:
        return features.to(device, memory_format=torch.channels_last)
    return features.to(device)


@torch.no_grad()
def output_classes(model: nn.Module, feature_shape: tuple[int, ...]) -> int:
    """How many logits ``model`` gives for one sample of features ``feature_shape``
    (a forward pass on zeros in eval mode; the model's mode is restored)."""
    training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        out = model(torch.zeros(2, *feature_shape, device=device))
    except Exception as err:
        raise ValueError(
            f"the server model does not take features of shape {tuple(feature_shape)}: {err}"
        ) from err
    finally:
        model.train(training)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the server model must map a batch of features to logits, gave {shape}")
    return int(out.shape[1])


def _without(batch: Batch, excluded: Mapping[NodeKey, str]) -> Batch:
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


@dataclass
class ServerTrainResult:
    """What one call of :meth:`ServerTrainer.train` did.

    ``excluded`` maps each node whose samples made a training step non-finite to
    the reason; their samples were left out of the rest of the call's training.
    ``skipped_steps`` counts the steps not taken because their loss or gradients
    were not finite.
    """

    loss: float
    accuracy: float
    samples: int
    seconds: float
    excluded: dict[NodeKey, str] = field(default_factory=dict)
    skipped_steps: int = 0
    ce: float = 0.0  # the loss's cross-entropy part
    kd: float = 0.0  # its KD part against the edge logits (loss = ce + alpha * kd)


class ServerTrainer:
    """The server-side large model with its optimizer and learning-rate scheduler.

    Parameters
    ----------
    num_classes : int | None
        Size of the classification head (for your own ``model``, may be left out
        when ``feature_shape`` is given).
    model_name : str (default: "resnet55")
        A built-in server model: ``resnet55`` or ``resnet109``.
    model : nn.Module | None (default: None)
        Your own server model instead: any module that maps a batch of features to
        logits (its name is then its class name).
    feature_shape : tuple[int, ...] | None (default: None)
        One sample's feature shape (the built-in models': 16 x 32 x 32); with
        ``model`` and no ``num_classes``, the class count is read off the model's
        output on features of this shape. The strategy validates replies against it.
    lr : float (default: 0.001)
        Adam learning rate.
    weight_decay : float (default: 5e-4)
        Adam weight decay.
    temperature : float (default: 3.0)
        KD temperature.
    alpha : float (default: 1.0)
        Weight of the KD term against the edge logits.
    batch_size : int (default: 64)
        Server training batch size.
    seed : int (default: 0)
        Seeds the built-in model's initialisation and the shuffling (a ``model``
        of your own is used as you built it: seed it yourself).
    total_epochs : int | None (default: None)
        Server epochs of the whole run (rounds x server epochs). When given, the
        learning rate follows a cosine decay to 5% of ``lr`` over them, so the last
        rounds train with a small step; otherwise it is halved whenever the
        training loss stalls for 3 rounds (unless ``lr_schedule`` is given).
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    precision : str (default: "float32")
        ``float32``, ``bfloat16`` (autocast, float32 master weights; losses and
        softmaxes in float32), ``float16`` (the same with a gradient scaler; for
        GPUs) or ``auto`` (bfloat16 where this process's device runs it
        natively): for training and for the server's logits and scores.
    optimizer : OptimizerFactory | None (default: None)
        Builds the optimizer from the model's parameters (its learning rate is set
        to ``lr``; ``weight_decay`` is then the factory's business); Adam with
        ``weight_decay`` when None.
    lr_schedule : LRScheduleFactory | None (default: None)
        Builds the learning-rate schedule from the optimizer, e.g.
        ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)``; its
        ``step()`` is called after every server epoch and its state is
        checkpointed. Replaces the cosine decay and the plateau rule.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        model_name: str = "resnet55",
        lr: float = 0.001,
        weight_decay: float = 5e-4,
        temperature: float = 3.0,
        alpha: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        device: str = "auto",
        total_epochs: int | None = None,
        model: nn.Module | None = None,
        feature_shape: tuple[int, ...] | None = None,
        optimizer: OptimizerFactory | None = None,
        precision: str = "float32",
        lr_schedule: LRScheduleFactory | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if model is None:
            if model_name.removesuffix(COMPACT) not in SERVER_MODELS:
                raise ValueError(
                    f"server model must be one of {', '.join(SERVER_MODELS)} (or their "
                    f"{COMPACT} variants), got {model_name!r}"
                )
            if num_classes is None:
                raise ValueError("num_classes is required for a built-in server model")
            model = seeded_model(model_name, num_classes, seed)
            feature_shape = feature_shape or feature_shape_of(model_name)
        else:
            model_name = type(model).__name__
            if num_classes is None:
                if feature_shape is None:
                    raise ValueError("give num_classes or feature_shape for your own server model")
                num_classes = output_classes(model, feature_shape)
        self.model = model.to(self.device)
        # channels-last convolutions run ~1.5x faster on the CPU and suit CUDA too
        self.model.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.feature_shape: tuple[int, ...] | None = (
            None if feature_shape is None else tuple(feature_shape)
        )
        self.model_name = model_name
        self.progress_seconds = PROGRESS_SECONDS  # epochs longer than this are logged
        self.temperature = temperature
        self.alpha = alpha
        self.batch_size = batch_size
        self.optimizer = make_optimizer(self.model.parameters(), lr, optimizer, weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        if lr_schedule is not None:
            self.scheduler = lr_schedule(self.optimizer)
        elif total_epochs:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=total_epochs, eta_min=0.05 * lr
            )
        else:
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=0.5, patience=3
            )
        self.generator = torch.Generator().manual_seed(seed)
        self.scaler = loss_scaler(self.precision, self.device)  # float16 only

    @classmethod
    def from_run_config(cls, config: RunConfig, num_classes: int) -> ServerTrainer:
        """The trainer a run's config asks for, its learning rate decaying over the
        run's ``num-server-rounds x server-epochs`` epochs."""
        return cls(
            num_classes,
            model_name=config.server_model_name,
            lr=config.server_lr,
            temperature=config.temperature,
            alpha=config.alpha,
            batch_size=config.server_batch_size,
            seed=config.seed,
            device=config.device,
            total_epochs=config.num_server_rounds * config.server_epochs,
            precision=config.precision,
        )

    def state_dict(self) -> dict[str, Any]:
        """The model, optimizer, schedule, loss-scale and shuffling state (for
        checkpoints)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
            "generator": self.generator.get_state(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.generator.set_state(state["generator"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def train(
        self, store: FeatureStore, epochs: int, nodes: list[NodeKey] | None = None
    ) -> ServerTrainResult:
        """Train ``epochs`` over the stored features of ``nodes`` (all by default).

        The model and optimizer never take a step whose loss or gradients are not
        finite: such a step is skipped, its batch's nodes are checked one by one in
        float32 (:meth:`_culprits`), and a node whose samples alone give a
        non-finite loss or gradient is excluded for the rest of the call
        (``result.excluded``). In float16 a step whose scaled gradients overflow is
        skipped too and the loss scale lowered; it excludes nobody unless a node's
        samples fail in float32 as well.
        """
        start = time.perf_counter()
        excluded: dict[NodeKey, str] = {}
        skipped = 0

        def batches() -> Iterator[Batch]:
            for batch in store.batches(self.batch_size, self.generator, nodes):
                if excluded:
                    batch = _without(batch, excluded)
                if len(batch.labels) >= 2:  # BatchNorm needs more than one sample
                    yield batch

        def step(batch: Batch) -> StepOutcome | None:
            nonlocal skipped
            outcome = self._forward_backward(batch)
            if outcome is None:
                skipped += 1
                excluded.update(self._culprits(batch))
                return None
            self.scaler.step(self.optimizer)  # optimizer.step() unless float16
            self.scaler.update()
            return outcome

        epoch = {"number": 0, "began": time.perf_counter()}

        def epoch_end(totals: EpochTotals) -> None:
            if totals.seen and self.scheduler is not None:
                self.scheduler.step()
            epoch["number"] += 1
            seconds = time.perf_counter() - epoch["began"]
            if totals.seen and seconds > self.progress_seconds:
                means = totals.means()
                logger.info(
                    "server epoch %d/%d: loss %.4f (CE %.4f, KD %.4f) | %d samples in "
                    "%.1f s (%.0f samples/s)",
                    epoch["number"],
                    epochs,
                    means["loss"],
                    means["ce"],
                    means["kd"],
                    totals.seen,
                    seconds,
                    totals.seen / seconds,
                )
            epoch["began"] = time.perf_counter()

        totals = train_epochs(epochs, batches, step, epoch_end)
        means = totals.means()
        if totals.seen and self.plateau is not None:
            self.plateau.step(means["loss"])
        return ServerTrainResult(
            loss=means["loss"],
            accuracy=means["accuracy"],
            samples=totals.seen,
            seconds=time.perf_counter() - start,
            excluded=excluded,
            skipped_steps=skipped,
            ce=means["ce"],
            kd=means["kd"],
        )

    def _forward_backward(self, batch: Batch, check: bool = False) -> StepOutcome | None:
        """Loss, logits and labels of ``batch`` in train mode, gradients in
        ``.grad`` (unscaled); None (gradients cleared, BatchNorm statistics as
        before; in float16 the loss scale lowered) when the loss or a gradient is
        not finite. ``check``: in float32 and unscaled, whatever the precision."""
        self.model.train()
        buffers = self._buffers()
        feats = _to_device(batch.features, self.device)
        labels = batch.labels.to(self.device)
        scaled = self.scaler.is_enabled() and not check
        self.optimizer.zero_grad(set_to_none=True)
        with autocast("float32" if check else self.precision, self.device):
            logits = self.model(feats)
        logits = logits.float()  # the loss and its softmaxes in float32
        parts = ce_kd_loss(
            logits, labels, batch.edge_logits.to(self.device), self.temperature, self.alpha
        )
        finite = bool(torch.isfinite(parts.loss))
        if finite:
            if scaled:
                self.scaler.scale(parts.loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                parts.loss.backward()
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            finite = not grads or bool(torch.isfinite(torch.stack(_norms(grads))).all())
            if scaled and not finite:
                self.scaler.update()  # lowers the scale for the next step
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_buffers(buffers)
            return None
        return parts, logits.detach(), labels

    def _buffers(self) -> list[Tensor]:
        """A copy of the model's buffers (its BatchNorm statistics)."""
        return [b.detach().clone() for b in self.model.buffers()]

    @torch.no_grad()
    def _restore_buffers(self, saved: list[Tensor]) -> None:
        """Put back the buffers :meth:`_buffers` copied."""
        for buffer, copy in zip(self.model.buffers(), saved, strict=True):
            buffer.copy_(copy)

    def _culprits(self, batch: Batch) -> dict[NodeKey, str]:
        """The nodes of a batch whose samples alone give a non-finite loss or
        gradient (a forward and backward pass per node; nothing is updated)."""
        culprits: dict[NodeKey, str] = {}
        buffers = self._buffers()
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
            if self._forward_backward(part, check=True) is None:
                culprits[node] = (
                    "its features give a non-finite loss or gradient in server training"
                )
        self.optimizer.zero_grad(set_to_none=True)
        self._restore_buffers(buffers)  # the checks' BatchNorm statistics are not training's
        return culprits

    @torch.no_grad()
    def predict(self, features: Tensor, batch_size: int = 256) -> Tensor:
        """Logits of the server model on float features, in eval mode (CPU tensor)."""
        self.model.eval()
        out = []
        with autocast(self.precision, self.device):
            for i in range(0, len(features), batch_size):
                batch = _to_device(features[i : i + batch_size].float(), self.device)
                out.append(self.model(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def logits_for(self, store: FeatureStore, node: NodeKey) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, logits)`` of one stored node, for its next round's KD.

        Raises NonFiniteOutput when the server model's logits on the node's
        features are not finite (they are never sent).
        """
        payload = store.payload(node)
        logits = self.predict(store.node_features(node))
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutput("the server model's logits on its features are not finite")
        return payload.ids, logits.numpy()

    @torch.no_grad()
    def evaluate(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Loss and accuracy of the server model on test features.

        Raises NonFiniteOutput when the model's logits on ``features`` are not finite.
        """
        logits = self.predict(features)
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteOutput("the server model's logits on its features are not finite")
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "num_examples": 0}
        return {
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
            "num_examples": len(labels),
        }
