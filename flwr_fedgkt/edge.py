"""What a FedGKT client does, without Flower.

One round on the edge: train the small model with ``CE + alpha * KD`` (KD against
the server logits the client holds, each sample's target looked up **by its sample
id**, never by batch position), then extract features, logits, labels and sample ids
over the training split with the model in eval mode.

The edge model is any ``nn.Module`` whose ``forward`` returns ``(logits,
features)`` (the paper's ResNet-8 by default). Data is any
:data:`~flwr_fedgkt.edge_data.EdgeData` (a :class:`~flwr_fedgkt.data.SampleSet`,
or any data set or sequence of ``(x, y)`` / ``(x, y, sample_id)`` items), read in
batches by :mod:`flwr_fedgkt.edge_data`.

Training may augment each batch per sample (the training split's own
``augmentation``, e.g. :class:`flwr_fedgkt.data.RandomCropFlip`, or one passed in);
it changes pixels only, never the order of a batch, so every image keeps its sample
id and its KD target. Extraction for upload never augments a ``SampleSet``: it runs
over the stored (un-augmented) images, in eval mode.

This module imports no Flower code.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codec import encode_features, encoded_digest
from .compression import compress
from .data import Augmentation
from .distill import DistillLoss, ce_kd_loss, kd_loss
from .edge_data import EdgeData, ordered_batches, training_batches
from .models import seeded_model
from .precision import autocast, loss_scaler, resolve_precision
from .privacy.mechanisms import distance_correlation
from .server_model import takes_channels_last, to_device
from .threads import FairThreads
from .training import (
    OptimizerFactory,
    StepOutcome,
    make_optimizer,
    optimizer_step,
    set_lr,
    train_epochs,
)

__all__ = [
    "EdgeData",
    "OptimizerFactory",
    "LogitTable",
    "Extracted",
    "EdgeTrainer",
    "resolve_device",
    "train_metrics",
    "evaluate_metrics",
    "extractor_of",
]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LogitTable:
    """Server logits keyed by sample id.

    ``lookup(ids)`` returns the logits of those samples and a mask of the ones
    that have a target (a sample the server has not scored yet has none).
    """

    def __init__(self, ids: np.ndarray | Tensor, logits: np.ndarray | Tensor) -> None:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        logits_t = torch.as_tensor(logits, dtype=torch.float32)
        if ids_t.ndim != 1 or logits_t.ndim != 2 or logits_t.shape[0] != ids_t.shape[0]:
            raise ValueError(
                f"server logits of shape {tuple(logits_t.shape)} do not match "
                f"{tuple(ids_t.shape)} sample ids"
            )
        order = torch.argsort(ids_t)
        self.ids = ids_t[order]
        self.logits = logits_t[order]
        if self.ids.numel() > 1 and bool((self.ids[1:] == self.ids[:-1]).any()):
            raise ValueError("server logits hold duplicate sample ids")

    def __len__(self) -> int:
        return int(self.ids.numel())

    def lookup(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        ids = ids.to("cpu", torch.long)
        if len(self) == 0:
            return torch.zeros(len(ids), 0), torch.zeros(len(ids), dtype=torch.bool)
        pos = torch.searchsorted(self.ids, ids).clamp_(max=len(self) - 1)
        found = self.ids[pos] == ids
        return self.logits[pos], found


@dataclass
class Extracted:
    """What a client uploads: features, edge logits, labels and sample ids."""

    features: Tensor  # N x feature shape, float32, CPU
    logits: Tensor  # N x K, float32, CPU
    labels: Tensor  # N, int64
    ids: Tensor  # N, int64

    def arrays(
        self,
        dtype: str,
        with_logits: bool = True,
        held: str = "",
        compression: str = "none",
    ) -> dict[str, np.ndarray]:
        """The arrays a reply carries, by name: the features in wire dtype
        ``dtype`` (:func:`~flwr_fedgkt.features.encode_features`; with
        ``compression`` their bytes compressed, :mod:`flwr_fedgkt.compression`),
        ``labels``, ``ids`` and, for training, ``logits``.

        When the features' digest (:func:`~flwr_fedgkt.features.encoded_digest`)
        is ``held``, the digest of the features the server holds for this node,
        they have not changed since the node's last upload: only ``ids`` and, for
        training, ``logits`` go."""
        arrays = {"ids": self.ids.numpy().astype(np.int64)}
        encoded = encode_features(self.features, dtype)
        if not held or encoded_digest(encoded) != held:
            arrays = encoded.arrays()
            arrays["features"] = compress(encoded.data, compression)
            arrays["labels"] = self.labels.numpy().astype(np.int64)
            arrays["ids"] = self.ids.numpy().astype(np.int64)
        if with_logits:
            arrays["logits"] = self.logits.numpy().astype(np.float32)
        return arrays


class EdgeTrainer:
    """The edge model and its optimizer, which persist across rounds on one client.

    Parameters
    ----------
    num_classes : int | None (default: None)
        Size of the classification head of the built-in model (``model_name``);
        not used with ``model``.
    lr : float (default: 0.001)
        Learning rate of the optimizer (Adam with weight decay 5e-4 by default).
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    model_name : str (default: "resnet8")
        Edge architecture from :func:`flwr_fedgkt.models.build_model`, when no
        ``model`` is given.
    seed : int | None (default: None)
        Seeds the built-in model's initialisation (without touching the global RNG).
    freeze_extractor : bool (default: False)
        Keep the feature extractor (the model's ``extractor`` or ``stem`` module)
        fixed: its weights are not trained and its BatchNorm statistics not
        updated, so the features it extracts never change and a server may keep
        the first upload (``freeze-extractor``).
    model : nn.Module | None (default: None)
        An edge model of the user's own: ``forward(x)`` returns ``(logits,
        features)``.
    optimizer : OptimizerFactory | None (default: None)
        Builds the optimizer from the trainable parameters; its learning rate is
        set to ``lr``. Adam with weight decay 5e-4 when None.
    precision : str (default: "float32")
        Training in ``float32``, ``bfloat16`` (autocast; float32 weights, losses
        and softmaxes), ``float16`` (the same with a gradient scaler; for GPUs) or
        ``auto`` (bfloat16 where this device runs it natively).
        Extraction for upload always runs in float32.
    torch_threads : int (default: 0)
        torch's CPU threads while training and extracting: 0 takes the process's
        CPUs (a simulated ClientApp's ``num-cpus``) less those other processes
        keep busy (:class:`~flwr_fedgkt.threads.FairThreads`); a count fixes them.
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        num_classes: int | None = None,
        lr: float = 0.001,
        device: str = "auto",
        model_name: str = "resnet8",
        seed: int | None = None,
        freeze_extractor: bool = False,
        *,
        model: nn.Module | None = None,
        optimizer: OptimizerFactory | None = None,
        precision: str = "float32",
        torch_threads: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.threads = FairThreads(torch_threads) if self.device.type == "cpu" else None
        if model is None:
            if num_classes is None:
                raise ValueError("give the edge model, or num_classes for the built-in one")
            model = seeded_model(model_name, num_classes, seed)
        self.model = model.to(self.device)
        self.freeze_extractor = freeze_extractor
        self.stem: nn.Module | None = None
        if freeze_extractor:
            self.stem = extractor_of(self.model)
            self.stem.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, lr, optimizer)
        self.scaler = loss_scaler(self.precision, self.device)  # float16 only
        self._channels_last: bool | None = None  # probed on the first batch
        # the node's secret for what it draws before an upload (flwr_fedgkt.privacy):
        # kept with the edge state, never sent, never derived from the run's seed
        self.privacy_secret = secrets.randbits(63)

    def _to_device(self, images: Tensor) -> Tensor:
        """A batch of images on the device, channels-last when the model takes it
        (probed once, on the first batch: :func:`takes_channels_last`): ResNet-8's
        convolutions ran 1.1x (training) to 3x (extraction) faster so on a CPU."""
        if self._channels_last is None:
            shape = tuple(images.shape[1:])
            self._channels_last = takes_channels_last(self.model, shape)
        return to_device(images, self.device, self._channels_last)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The model, optimizer and loss-scale state (float16; empty otherwise),
        with the node's privacy secret."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "privacy_secret": self.privacy_secret,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "privacy_secret" in state:
            self.privacy_secret = int(state["privacy_secret"])

    def state_bytes(self) -> bytes:
        """:meth:`state_dict`, serialised (for a client's persistent state)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_state_bytes(self, blob: bytes) -> None:
        """Continue from :meth:`state_bytes`."""
        self.load_state_dict(
            torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        )

    # -- one round -----------------------------------------------------------------
    def train(
        self,
        data: EdgeData,
        epochs: int,
        batch_size: int,
        teacher: LogitTable | None = None,
        temperature: float = 3.0,
        alpha: float = 1.0,
        generator: torch.Generator | None = None,
        augment: Augmentation | None = None,
        frozen: bool = False,
        nopeek_weight: float = 0.0,
    ) -> dict[str, float]:
        """Train ``epochs`` over ``data``; KD targets come from ``teacher`` by sample id.
        With ``frozen`` (or a trainer built with ``freeze_extractor``) the
        extractor is not trained and its BatchNorm statistics are not updated.

        Batches are augmented per sample with ``augment``, or else with
        ``data.augmentation`` (to train without, pass a set whose augmentation is
        ``None``), drawing from ``generator``; ids stay with their images, so KD
        targets stay aligned.
        With ``nopeek_weight`` > 0 the loss gains that weight times the distance
        correlation of each batch's images and features (NoPeek,
        :func:`~flwr_fedgkt.privacy.distance_correlation`), so that the features
        say less about the images.
        Returns the last epoch's mean training loss, its cross-entropy and KD parts
        (``train_loss = train_ce + alpha * train_kd``, without the NoPeek term)
        and accuracy.
        """
        self.model.train()
        if self.threads is not None:
            self.threads.start()
        stem = self.stem
        if stem is None and frozen:  # frozen for this round only (freeze-after)
            stem = extractor_of(self.model)
        thawed = []
        if stem is not None:
            stem.eval()  # frozen: its BatchNorm statistics stay as they are
            thawed = [p for p in stem.parameters() if p.requires_grad]
            for param in thawed:  # no gradient: the optimizer leaves them as they are
                param.requires_grad_(False)

        def step(batch: tuple[Tensor, Tensor, Tensor]) -> StepOutcome:
            images, labels, ids = batch
            if self.threads is not None:
                self.threads.update()  # leave the CPUs other processes keep busy
            images, labels = self._to_device(images), labels.to(self.device)
            with autocast(self.precision, self.device):
                logits, features = self.model(images)
            logits = logits.float()  # the loss and its softmaxes in float32
            parts = self._loss(logits, labels, ids, teacher, temperature, alpha)
            loss = parts.loss
            if nopeek_weight > 0:
                loss = loss + nopeek_weight * distance_correlation(images, features.float())
            optimizer_step(self.optimizer, loss, self.scaler)
            return parts, logits, labels

        try:
            totals = train_epochs(
                epochs, lambda: training_batches(data, batch_size, generator, augment), step
            )
        finally:
            for param in thawed:
                param.requires_grad_(True)
        return {f"train_{key}": value for key, value in totals.means().items()}

    def _loss(
        self,
        logits: Tensor,
        labels: Tensor,
        ids: Tensor,
        teacher: LogitTable | None,
        temperature: float,
        alpha: float,
    ) -> DistillLoss:
        if teacher is None or len(teacher) == 0 or alpha == 0:
            return ce_kd_loss(logits, labels, None)
        targets, found = teacher.lookup(ids)
        if bool(found.all()):
            return ce_kd_loss(logits, labels, targets.to(self.device), temperature, alpha)
        ce = F.cross_entropy(logits, labels)
        kd = torch.zeros((), device=ce.device)
        if bool(found.any()):
            mask = found.to(self.device)
            # KD averaged over the samples that have a target, weighted by their share
            share = mask.sum() / len(mask)
            kd = kd_loss(logits[mask], targets[found].to(self.device), temperature) * share
        return DistillLoss(ce + alpha * kd, ce.detach(), kd.detach())

    @torch.no_grad()
    def extract(self, data: EdgeData, batch_size: int = 32) -> Extracted:
        """Features, logits, labels and ids over ``data``, in eval mode, in order
        (a ``SampleSet`` never augmented). ValueError when two samples share an id.
        Small batches keep the activations in the CPU's caches (32 ran 5x faster
        than 256 for ResNet-8 on 2 cores)."""
        if self.threads is not None:
            self.threads.start()
        self.model.eval()
        feats, logits, labels, ids = [], [], [], []
        for x, y, i in ordered_batches(data, batch_size):
            out, f = self.model(self._to_device(x))
            feats.append(f.float().cpu().contiguous())
            logits.append(out.float().cpu())
            labels.append(y)
            ids.append(i)
        extracted = Extracted(
            features=torch.cat(feats) if feats else torch.zeros(0),
            logits=torch.cat(logits) if logits else torch.zeros(0, 0),
            labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            ids=torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long),
        )
        if len(torch.unique(extracted.ids)) != len(extracted.ids):
            raise ValueError("the data set gives two samples the same sample id")
        return extracted

    @staticmethod
    def score(logits: Tensor, labels: Tensor) -> dict[str, float]:
        """Cross-entropy loss and accuracy of ``logits`` against ``labels``."""
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0}
        return {
            "loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
        }


def extractor_of(model: nn.Module) -> nn.Module:
    """The edge model's feature extractor: its ``extractor`` or ``stem`` module."""
    for name in ("extractor", "stem"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"{type(model).__name__} has no 'extractor' or 'stem' module to freeze; name the "
        "part of the model that computes the features one of these"
    )


def train_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The edge's training metrics as a reply carries them (Flower's kebab-case;
    the seconds as ``edge-train-seconds``, ``edge-extract-seconds``)."""
    return {
        (f"edge-{key}" if key.endswith("_seconds") else key).replace("_", "-"): value
        for key, value in metrics.items()
    }


def evaluate_metrics(scores: Mapping[str, float]) -> dict[str, float]:
    """The edge model's own test scores as a reply carries them."""
    return {"edge-accuracy": scores["accuracy"], "edge-loss": scores["loss"]}
