"""What a FedGKT client does, without Flower.

One round on the edge: train the small model with ``CE + alpha * KD`` (KD against
the server logits the client holds, each sample's target looked up **by its sample
id**, never by batch position), then extract features, logits, labels and sample ids
over the training split with the model in eval mode.

Training may augment each batch per sample (the training split's own
``augmentation``, e.g. :class:`flwr_fedgkt.data.RandomCropFlip`, or one passed in);
it changes pixels only, never the order of a batch, so every image keeps its sample
id and its KD target. Extraction for upload never augments: it runs over the stored
(un-augmented) images, in eval mode.

This module imports no Flower code.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .data import Augmentation, SampleSet
from .distill import DistillLoss, ce_kd_loss, kd_loss
from .models import seeded_model

__all__ = [
    "LogitTable",
    "Extracted",
    "EdgeTrainer",
    "edge_generator",
    "resolve_device",
    "training_batches",
    "train_metrics",
    "evaluate_metrics",
]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def edge_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """The shuffling RNG of one node's edge training in one round: different per
    node and round, reproducible for a given seed."""
    return torch.Generator().manual_seed(hash((seed, partition_id, server_round)) % 2**63)


def training_batches(
    data: SampleSet,
    batch_size: int,
    generator: torch.Generator | None = None,
    augment: Augmentation | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """One epoch of shuffled ``(images, labels, ids)`` batches, on the CPU.

    Every batch's images are augmented per sample with ``augment``, or else with
    ``data.augmentation`` when it has one, drawing from ``generator``; labels and
    ids are left as they are, aligned with their images.
    """
    loader = DataLoader(
        TensorDataset(data.images, data.labels, data.ids),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    augment = augment if augment is not None else data.augmentation
    for images, labels, ids in loader:
        if augment is not None:
            images = augment(images, generator)
        yield images, labels, ids


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

    features: Tensor  # N x 16 x 32 x 32, float32, CPU
    logits: Tensor  # N x K, float32, CPU
    labels: Tensor  # N, int64
    ids: Tensor  # N, int64


class EdgeTrainer:
    """The edge model and its optimizer, which persist across rounds on one client.

    Parameters
    ----------
    num_classes : int
        Size of the classification head.
    lr : float (default: 0.001)
        Adam learning rate (weight decay 5e-4).
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    model_name : str (default: "resnet8")
        Edge architecture from :func:`flwr_fedgkt.models.build_model`.
    seed : int | None (default: None)
        Seeds the model initialisation (without touching the global RNG).
    freeze_extractor : bool (default: False)
        Keep the stem (the feature extractor) fixed: its weights are not trained and
        its BatchNorm statistics not updated, so the features it extracts never
        change and a server may keep the first upload (``freeze-extractor``).
    """

    def __init__(
        self,
        num_classes: int,
        lr: float = 0.001,
        device: str = "auto",
        model_name: str = "resnet8",
        seed: int | None = None,
        freeze_extractor: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.model = seeded_model(model_name, num_classes, seed).to(self.device)
        self.freeze_extractor = freeze_extractor
        self.stem: nn.Module | None = None
        if freeze_extractor:
            stem = getattr(self.model, "stem", None)
            if not isinstance(stem, nn.Module):
                raise ValueError(f"{model_name} has no stem to freeze")
            stem.requires_grad_(False)
            self.stem = stem
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=5e-4)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- state ---------------------------------------------------------------------
    def state_bytes(self) -> bytes:
        """Model and optimizer state, serialised (for a client's persistent state)."""
        buffer = io.BytesIO()
        torch.save(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, buffer
        )
        return buffer.getvalue()

    def load_state_bytes(self, blob: bytes) -> None:
        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- one round -----------------------------------------------------------------
    def train(
        self,
        data: SampleSet,
        epochs: int,
        batch_size: int,
        teacher: LogitTable | None = None,
        temperature: float = 3.0,
        alpha: float = 1.0,
        generator: torch.Generator | None = None,
        augment: Augmentation | None = None,
    ) -> dict[str, float]:
        """Train ``epochs`` over ``data``; KD targets come from ``teacher`` by sample id.

        Batches are augmented per sample with ``augment``, or else with
        ``data.augmentation`` (to train without, pass a set whose augmentation is
        ``None``), drawing from ``generator``; ids stay with their images, so KD
        targets stay aligned.
        Returns the last epoch's mean training loss, its cross-entropy and KD parts
        (``train_loss = train_ce + alpha * train_kd``) and accuracy.
        """
        self.model.train()
        if self.stem is not None:
            self.stem.eval()  # frozen: its BatchNorm statistics stay as they are
        sums = np.zeros(3)  # loss, ce, kd, each summed over samples
        correct, seen = 0, 0
        for _ in range(max(epochs, 0)):
            sums[:] = 0.0
            correct, seen = 0, 0
            for images, labels, ids in training_batches(data, batch_size, generator, augment):
                images, labels = images.to(self.device), labels.to(self.device)
                logits, _ = self.model(images)
                parts = self._loss(logits, labels, ids, teacher, temperature, alpha)
                self.optimizer.zero_grad(set_to_none=True)
                parts.loss.backward()
                self.optimizer.step()
                sums += [float(t.detach()) * len(labels) for t in parts]
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
        loss, ce, kd = (sums / max(seen, 1)).tolist()
        return {
            "train_loss": loss,
            "train_ce": ce,
            "train_kd": kd,
            "train_accuracy": correct / max(seen, 1),
        }

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
    def extract(self, data: SampleSet, batch_size: int = 256) -> Extracted:
        """Features, logits, labels and ids over ``data``, in eval mode, in order
        (never augmented)."""
        self.model.eval()
        feats, logits = [], []
        for start in range(0, len(data), batch_size):
            out, f = self.model(data.images[start : start + batch_size].to(self.device))
            feats.append(f.float().cpu())
            logits.append(out.float().cpu())
        num_classes = self.model.fc.out_features if isinstance(self.model.fc, nn.Linear) else 0
        return Extracted(
            features=torch.cat(feats) if feats else torch.zeros(0, 16, 32, 32),
            logits=torch.cat(logits) if logits else torch.zeros(0, num_classes),
            labels=data.labels.clone(),
            ids=data.ids.clone(),
        )

    @staticmethod
    def score(logits: Tensor, labels: Tensor) -> dict[str, float]:
        """Cross-entropy loss and accuracy of ``logits`` against ``labels``."""
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0}
        return {
            "loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
        }


def train_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The edge's training metrics as a reply carries them (Flower's kebab-case)."""
    return {key.replace("_", "-"): value for key, value in metrics.items()}


def evaluate_metrics(scores: Mapping[str, float]) -> dict[str, float]:
    """The edge model's own test scores as a reply carries them."""
    return {"edge-accuracy": scores["accuracy"], "edge-loss": scores["loss"]}
