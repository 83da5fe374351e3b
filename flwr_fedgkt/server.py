"""What the FedGKT server does, without Flower.

The large model (ResNet-55 / ResNet-109) trains on the edge features of all clients
with ``CE + alpha * KD`` (KD against each sample's edge logits), shuffled across
clients; it then scores each client's features to give that client its server logits
for the next round.

This module imports no Flower code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import RunConfig
from .distill import ce_kd_loss
from .edge import resolve_device
from .features import FeatureStore
from .models import count_parameters, seeded_model

__all__ = ["ServerTrainer", "ServerTrainResult"]


@dataclass
class ServerTrainResult:
    loss: float
    accuracy: float
    samples: int
    seconds: float


class ServerTrainer:
    """The server-side large model with its optimizer and learning-rate scheduler.

    Parameters
    ----------
    num_classes : int
        Size of the classification head.
    model_name : str (default: "resnet55")
        ``resnet55`` or ``resnet109``.
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
        Seeds the model initialisation and the shuffling.
    total_epochs : int | None (default: None)
        Server epochs of the whole run (rounds x server epochs). When given, the
        learning rate follows a cosine decay to 5% of ``lr`` over them, so the last
        rounds train with a small step; otherwise it is halved whenever the
        training loss stalls for 3 rounds (as in the reference implementation).
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    """

    def __init__(
        self,
        num_classes: int,
        model_name: str = "resnet55",
        lr: float = 0.001,
        weight_decay: float = 5e-4,
        temperature: float = 3.0,
        alpha: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        device: str = "auto",
        total_epochs: int | None = None,
    ) -> None:
        if model_name not in ("resnet55", "resnet109"):
            raise ValueError(f"server model must be resnet55 or resnet109, got {model_name!r}")
        self.device = resolve_device(device)
        # channels-last convolutions run ~1.5x faster on the CPU and suit CUDA too
        self.model = seeded_model(model_name, num_classes, seed).to(self.device)
        self.model.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.model_name = model_name
        self.temperature = temperature
        self.alpha = alpha
        self.batch_size = batch_size
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        if total_epochs:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=total_epochs, eta_min=0.05 * lr
            )
        else:
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=0.5, patience=3
            )
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_run_config(cls, config: RunConfig, num_classes: int) -> ServerTrainer:
        """The trainer a run's config asks for, its learning rate decaying over the
        run's ``num-server-rounds x server-epochs`` epochs."""
        return cls(
            num_classes,
            model_name=config.server_model,
            lr=config.server_lr,
            temperature=config.temperature,
            alpha=config.alpha,
            batch_size=config.server_batch_size,
            seed=config.seed,
            device=config.device,
            total_epochs=config.num_server_rounds * config.server_epochs,
        )

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def train(
        self, store: FeatureStore, epochs: int, nodes: list[int] | None = None
    ) -> ServerTrainResult:
        """Train ``epochs`` over the stored features of ``nodes`` (all by default)."""
        start = time.perf_counter()
        self.model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(max(epochs, 0)):
            loss_sum, correct, seen = 0.0, 0, 0
            for feats, labels, edge_logits in store.batches(self.batch_size, self.generator, nodes):
                if len(labels) < 2:  # BatchNorm needs more than one sample
                    continue
                feats = feats.to(self.device, memory_format=torch.channels_last)
                labels = labels.to(self.device)
                logits = self.model(feats)
                loss = ce_kd_loss(
                    logits, labels, edge_logits.to(self.device), self.temperature, self.alpha
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += float(loss.detach()) * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            if seen and self.scheduler is not None:
                self.scheduler.step()
        if seen and self.plateau is not None:
            self.plateau.step(loss_sum / seen)
        return ServerTrainResult(
            loss=loss_sum / max(seen, 1),
            accuracy=correct / max(seen, 1),
            samples=seen,
            seconds=time.perf_counter() - start,
        )

    @torch.no_grad()
    def predict(self, features: Tensor, batch_size: int = 256) -> Tensor:
        """Logits of the server model on float features, in eval mode (CPU tensor)."""
        self.model.eval()
        out = [
            self.model(
                features[i : i + batch_size].to(
                    self.device, torch.float32, memory_format=torch.channels_last
                )
            )
            .float()
            .cpu()
            for i in range(0, len(features), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def logits_for(self, store: FeatureStore, node: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, logits)`` of one stored node, for its next round's KD."""
        payload = store.payload(node)
        return payload.ids, self.predict(store.node_features(node)).numpy()

    @torch.no_grad()
    def evaluate(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Loss and accuracy of the server model on test features."""
        logits = self.predict(features)
        if len(labels) == 0:
            return {"loss": 0.0, "accuracy": 0.0, "num_examples": 0}
        return {
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
            "num_examples": len(labels),
        }
