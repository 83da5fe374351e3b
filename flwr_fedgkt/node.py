"""The node's side of a round: its data, its settings, training and extraction.

A node (:class:`EdgeNode`) holds its data and an edge model (with its optimizer)
that persists between rounds and never leaves the node. Each round it restores
the edge model, trains it on its training data (with KD against the server
logits, looked up by sample id), extracts features, logits, labels and ids over
that data and saves the edge state again; on evaluation it extracts over its
test data and scores the edge model on it. The built-in app's node holds one
partition of the run's data set (:func:`partition_node`).

Where the edge state lives between rounds is an
:class:`~flwr_fedgkt.edge_state.EdgeStateStore` (:mod:`flwr_fedgkt.edge_state`).

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .edge import (
    EdgeTrainer,
    Extracted,
    LogitTable,
    OptimizerFactory,
    extractor_of,
    resolve_device,
)
from .edge_data import EdgeData, edge_generator
from .edge_state import EdgeStateStore, edge_state_store, pick_round, stale_rounds
from .instructions import RoundInstructions, check_feature_shape, parse_feature_shape
from .models import module_digest, seeded_model
from .node_data import (  # re-exported: the node's data helpers live there
    check_node_data,
    load_node_partition,
    partition_ids,
    partition_sample_ids,
)
from .precision import resolve_precision
from .privacy import Defences, release
from .settings import RunConfig

__all__ = [
    "partition_ids",
    "partition_sample_ids",
    "load_node_partition",
    "check_node_data",
    "ROUND_KEYS",
    "EdgeSettings",
    "RoundInstructions",
    "parse_feature_shape",
    "check_feature_shape",
    "node_stream",
    "EdgeNode",
    "edge_model_factory",
    "partition_node",
    # re-exported from edge_state for the Flower layer's imports
    "edge_state_store",
    "pick_round",
    "stale_rounds",
]


ROUND_KEYS = ("client-epochs", "client-lr", "batch-size", "temperature", "alpha")
"""Training settings the server's round config may set for a round (run-config
keys); the node's own settings give the ones it leaves out."""


@dataclass(frozen=True)
class EdgeSettings:
    """How a node trains its edge model in a round.

    Parameters
    ----------
    epochs : int (default: 1)
        Local epochs per round (``client-epochs``).
    lr : float (default: 0.001)
        Learning rate (``client-lr``).
    batch_size : int (default: 32)
        Training batch size (``batch-size``).
    temperature : float (default: 3.0)
        KD temperature T.
    alpha : float (default: 1.0)
        Weight of the KD term: ``loss = CE + alpha * KD``.
    """

    epochs: int = 1
    lr: float = 0.001
    batch_size: int = 32
    temperature: float = 3.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        RunConfig.from_mapping(self._keys())  # the run config's checks name a bad value

    def _keys(self) -> dict[str, Any]:
        return dict(zip(ROUND_KEYS, dataclasses.astuple(self), strict=True))

    @classmethod
    def from_run_config(cls, config: RunConfig) -> EdgeSettings:
        """The edge settings of a run config."""
        return cls(
            config.client_epochs,
            config.client_lr,
            config.batch_size,
            config.temperature,
            config.alpha,
        )

    def for_round(self, round_config: Mapping[str, Any]) -> EdgeSettings:
        """These settings with the round's values (:data:`ROUND_KEYS`) from the
        server's round config, so that a strategy can change the edge's epochs,
        learning rate, batch size, T or alpha by round; each value is checked as a
        run-config value is (ConfigError names a bad one)."""
        overrides = {key: round_config[key] for key in ROUND_KEYS if key in round_config}
        if not overrides:
            return self
        return self.from_run_config(RunConfig.from_mapping({**self._keys(), **overrides}))


# -- edge rounds --------------------------------------------------------------------
def node_stream(node_key: str) -> int:
    """A number for a node key that seeds the node's shuffling: the key itself when
    it is a partition id (a small decimal integer), else a CRC-32 of it; the same in
    every process (unlike ``hash`` of a string)."""
    if node_key.isdecimal() and len(node_key) <= 18:
        return int(node_key)
    return zlib.crc32(node_key.encode())


class EdgeNode:
    """A node's side of FedGKT rounds, without Flower.

    Each round restores the edge model and its optimizer from ``store`` (a fresh
    model from ``edge_model`` the first time), trains it on the node's data with
    CE + alpha * KD against the server logits (by sample id), extracts features,
    logits, labels and ids over the training data and saves the state again;
    :meth:`evaluate` extracts over the test data and scores the edge model.

    Parameters
    ----------
    edge_model : Callable[[], nn.Module]
        Builds the node's edge model (``forward(x)`` returns ``(logits,
        features)``); called every round, then the saved state is loaded into it.
    store : EdgeStateStore
        Where the edge state lives between rounds.
    settings : EdgeSettings (default: EdgeSettings())
        Training settings; a round's config may override them.
    seed : int (default: 0)
        With ``stream`` and the round, seeds the training's shuffling and
        augmentation, so runs repeat.
    stream : int (default: 0)
        This node's own stream of that seed (:func:`node_stream` of its key), so
        nodes shuffle differently.
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    freeze_extractor : bool (default: False)
        Train without changing the extractor (see :class:`EdgeTrainer`).
    optimizer : OptimizerFactory | None (default: None)
        Builds the optimizer (Adam, weight decay 5e-4, when None).
    precision : str (default: "float32")
        Training precision: ``float32``, ``bfloat16``, ``float16`` (with a
        gradient scaler) or ``auto`` (bfloat16 where this node's device runs it
        natively); ``self.precision`` is the one chosen.
    torch_threads : int (default: 0)
        torch's CPU threads (``torch-threads``; 0: from the process's resources,
        see :class:`~flwr_fedgkt.edge.EdgeTrainer`).
    defences : Defences | None (default: None)
        What the node applies before anything leaves it (:mod:`flwr_fedgkt.privacy`):
        every extraction's features and labels go through
        :func:`~flwr_fedgkt.privacy.release`, and NoPeek joins the training loss
        (a client builds its node with its own defences raised to what the
        round asks for: :meth:`~flwr_fedgkt.privacy.Defences.at_least`).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        edge_model: Callable[[], nn.Module],
        store: EdgeStateStore,
        settings: EdgeSettings | None = None,
        *,
        seed: int = 0,
        stream: int = 0,
        device: str = "auto",
        freeze_extractor: bool = False,
        optimizer: OptimizerFactory | None = None,
        precision: str = "float32",
        torch_threads: int = 0,
        defences: Defences | None = None,
    ) -> None:
        self.edge_model = edge_model
        self.defences = defences if defences is not None else Defences()
        self.torch_threads = torch_threads
        self.store = store
        self.settings = settings if settings is not None else EdgeSettings()
        self.seed = seed
        self.stream = stream
        self.device = device
        self.freeze_extractor = freeze_extractor
        self.optimizer = optimizer
        self.precision = resolve_precision(precision, resolve_device(device))
        # with a frozen extractor: its digest, as of the last train or evaluate
        self.extractor_digest: str | None = None

    def trainer(
        self, settings: EdgeSettings | None = None, before_round: int | None = None
    ) -> EdgeTrainer:
        """The edge trainer, restored from the newest state of a round before
        ``before_round`` (the newest state when None) when the store holds one,
        with the learning rate of ``settings`` (the node's own when None)."""
        return self._restore(settings, before_round)[0]

    def _restore(
        self, settings: EdgeSettings | None, before_round: int | None
    ) -> tuple[EdgeTrainer, bool]:
        """:meth:`trainer`, and whether a saved state was restored."""
        lr = (settings or self.settings).lr
        trainer = EdgeTrainer(
            lr=lr,
            device=self.device,
            freeze_extractor=self.freeze_extractor,
            model=self.edge_model(),
            optimizer=self.optimizer,
            precision=self.precision,
            torch_threads=self.torch_threads,
        )
        blob = self.store.load(before_round)
        if blob is not None:
            trainer.load_state_bytes(blob)
            trainer.set_lr(lr)  # this round's rate, not the saved one
        return trainer, blob is not None

    def train(
        self,
        data: EdgeData,
        server_round: int,
        teacher: LogitTable | None,
        settings: EdgeSettings | None = None,
        frozen: bool = False,
    ) -> tuple[Extracted, dict[str, float]]:
        """One round: restore the state of the round before (a node that trained
        ``server_round`` already, for a server that then crashed, trains it again
        from the same state), train on ``data`` (KD against ``teacher`` by sample
        id; shuffling seeded by ``edge_generator(seed, stream, server_round)``),
        extract over ``data``, save as ``server_round``'s state; with ``frozen``
        the extractor is not trained this round (``freeze-after``). Returns the
        extraction and the training metrics (``train_loss``, ``train_ce``,
        ``train_kd``, ``train_accuracy``), with the seconds its training and its
        extraction took (``train_seconds``, ``extract_seconds``)."""
        extracted, metrics, _ = self._round(data, None, server_round, teacher, settings, frozen)
        return extracted, metrics

    def train_and_test(
        self,
        data: EdgeData,
        test_data: EdgeData,
        server_round: int,
        teacher: LogitTable | None,
        settings: EdgeSettings | None = None,
        frozen: bool = False,
    ) -> tuple[Extracted, dict[str, float], Extracted, dict[str, float]]:
        """:meth:`train`, then the extraction over ``test_data`` and the edge
        model's own scores on it from the model just trained: what
        :meth:`evaluate` of this round would give, without restoring the state
        again. Returns the training extraction and metrics, then the test
        extraction and scores."""
        extracted, metrics, test = self._round(
            data, test_data, server_round, teacher, settings, frozen
        )
        assert test is not None
        return extracted, metrics, test[0], test[1]

    # pylint: disable=too-many-arguments
    def _round(
        self,
        data: EdgeData,
        test_data: EdgeData | None,
        server_round: int,
        teacher: LogitTable | None,
        settings: EdgeSettings | None,
        frozen: bool,
    ) -> tuple[Extracted, dict[str, float], tuple[Extracted, dict[str, float]] | None]:
        settings = settings or self.settings
        trainer, restored = self._restore(settings, server_round)
        if not restored and server_round > 0:
            # the node's first round: keep its fresh state as the state before it,
            # so that a server resumed from an older checkpoint that asks for this
            # round again finds it (the node may take part first in any round)
            self.store.save(trainer.state_bytes(), server_round - 1)
        began = time.perf_counter()
        metrics = trainer.train(
            data,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            teacher=teacher,
            temperature=settings.temperature,
            alpha=settings.alpha,
            generator=edge_generator(self.seed, self.stream, server_round),
            frozen=frozen,
            nopeek_weight=self.defences.nopeek_weight,
        )
        trained = time.perf_counter()
        release_key = 0 if frozen or trainer.stem is not None else server_round
        extracted = self._release(trainer, trainer.extract(data), "train", release_key)
        test = None
        if test_data is not None:
            tested = trainer.extract(test_data)
            scores = EdgeTrainer.score(tested.logits, tested.labels)  # on the true labels
            test = (self._release(trainer, tested, "test", release_key), scores)
        metrics["train_seconds"] = trained - began
        metrics["extract_seconds"] = time.perf_counter() - trained
        self._note_extractor(trainer)
        self.store.save(trainer.state_bytes(), server_round)
        return extracted, metrics, test

    def evaluate(
        self, data: EdgeData, server_round: int | None = None
    ) -> tuple[Extracted, dict[str, float]]:
        """The edge model's features over ``data`` (a test split) and its own
        ``{"loss", "accuracy"}`` on them, with the state after ``server_round``'s
        training (the newest when None); nothing is saved."""
        before = None if not server_round else server_round + 1
        trainer = self.trainer(before_round=before)
        extracted = trainer.extract(data)
        scores = EdgeTrainer.score(extracted.logits, extracted.labels)  # on the true labels
        self._note_extractor(trainer)
        release_key = 0 if trainer.stem is not None else (server_round or 0)
        return self._release(trainer, extracted, "test", release_key), scores

    def _release(
        self, trainer: EdgeTrainer, extracted: Extracted, split: str, release_key: int
    ) -> Extracted:
        """``extracted`` as it may leave the node under :attr:`defences`; the
        feature noise drawn for ``release_key``: the round, or 0 for every round
        while the extractor is frozen (the same features, which the server then
        holds, so that nothing is sent again)."""
        if not self.defences.active or len(extracted.ids) == 0:
            return extracted
        features, labels = release(
            extracted.features,
            extracted.labels,
            self.defences,
            num_classes=extracted.logits.shape[1],
            secret=trainer.privacy_secret,
            split=split,
            release_key=release_key,
        )
        return dataclasses.replace(extracted, features=features, labels=labels)

    def _note_extractor(self, trainer: EdgeTrainer) -> None:
        """Keep the digest of a frozen extractor (replies name it; a strategy
        whose nodes share one extractor checks it)."""
        if self.freeze_extractor:
            self.extractor_digest = module_digest(extractor_of(trainer.model))


def edge_model_factory(
    config: RunConfig, num_classes: int, partition_id: int
) -> Callable[[], nn.Module]:
    """The built-in edge model (ResNet-8) of a partition, its initialisation drawn
    from ``seed + partition_id``, or from ``seed`` alone with
    ``shared-extractor-init`` (every node starts from the same model)."""
    seed = config.seed if config.shared_extractor_init else config.seed + partition_id
    return partial(seeded_model, config.edge_model_name, num_classes, seed)


def partition_node(
    config: RunConfig,
    partition_id: int,
    num_classes: int,
    store: EdgeStateStore,
    defences: Defences | None = None,
) -> EdgeNode:
    """The built-in app's node for a partition: ResNet-8 (:func:`edge_model_factory`),
    the run config's edge settings, device and ``freeze-extractor``, its state in
    ``store`` (and in ``client-state-dir`` when set), and ``defences`` (the run
    config's when None)."""
    return EdgeNode(
        edge_model_factory(config, num_classes, partition_id),
        edge_state_store(store, config.client_state_dir, str(partition_id)),
        EdgeSettings.from_run_config(config),
        seed=config.seed,
        stream=partition_id,
        device=config.device,
        freeze_extractor=config.freeze_extractor,
        precision=config.precision,
        torch_threads=config.torch_threads,
        defences=config.defences if defences is None else defences,
    )
