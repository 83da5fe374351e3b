"""FedGKT as a Flower strategy on the Message API.

No weights are averaged. Each round:

1. ``configure_train`` sends every sampled node its *own* server logits (none in
   its first round) and the round's config;
2. ``aggregate_train`` validates each reply, stores the valid ones' features, trains
   the large server model on all stored features and computes fresh server logits
   for each node that replied;
3. ``configure_evaluate``/``aggregate_evaluate`` score the server model on the
   nodes' test-split features and collect the edge model's own accuracy.

A training instruction asks the node for its test split's upload too
(``test-features``), made by the model it just trained: exactly what the
evaluation message would fetch. Nodes sampled for evaluation whose training reply
carried it get no evaluation message, so with both fractions at 1 (the default) a
round is one message phase. Replies are pulled as they arrive
(:class:`~flwr_fedgkt.grid.PromptGrid`), not every 3 seconds.

A reply that fails validation is rejected with its reason (in the log and in the
round's record) and touches neither the feature store nor the server model.

The strategy only translates Flower Messages: everything else a round does on the
server is :class:`flwr_fedgkt.rounds.RoundEngine`'s, which the legacy-API strategy
holds too. Rounds run in Flower's own ``start`` loop;
:class:`flwr_fedgkt.pipeline.PipelinedFedGKT` is the schedule that overlaps the
server's training with the next round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import nn

from .budget import BudgetSpent, TimeBudget, complete_result
from .faces import HoldsEngine, log_engine_summary
from .grid import learn_keys, prompt, wait_for_nodes
from .models import extractor_and_server, module_digest
from .privacy import Defences
from .records import (
    CONFIG_KEY,
    LOGITS_KEY,
    MessageReply,
    arrays_bytes,
    has_test_upload,
    logits_record,
)
from .registry import SampleIds
from .rounds import RoundEngine, sample_size
from .server import ServerTrainer
from .server_model import load_server_state
from .settings import DEFAULTS, RunConfig
from .store import FeatureStore
from .training import LRScheduleFactory, OptimizerFactory
from .validation import AcceptedReply

__all__ = ["FedGKT", "learn_keys", "load_initial_arrays", "wait_for_nodes"]


_SERVER_TRAINING = {  # FedGKT's argument: ServerTrainer's
    "server_lr": "lr",
    "server_batch_size": "batch_size",
    "temperature": "temperature",
    "alpha": "alpha",
    "optimizer": "optimizer",
    "lr_schedule": "lr_schedule",
    "precision": "precision",
    "device": "device",
    "server_average": "average",
}


class FedGKT(HoldsEngine, Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) as a Flower strategy.

    Implementation based on https://arxiv.org/abs/2007.14513. Options shared with the
    run config take its defaults (:class:`~flwr_fedgkt.settings.Settings`), so
    ``FedGKT(model, feature_shape=...)`` trains as ``flwr run .`` does.

    Parameters
    ----------
    trainer : ServerTrainer | nn.Module
        The server-side large model with its optimizer and training settings (a
        :class:`~flwr_fedgkt.server.ServerTrainer`), trained in ``aggregate_train``;
        or just the server model (features to logits), trained with ``server_lr``,
        ``server_batch_size``, ``temperature``, ``alpha``, ``precision``, ``device``,
        ``server_average`` (run-config defaults when None), ``optimizer`` (Adam,
        weight decay 5e-4, when None) and ``lr_schedule`` (stepped per server epoch;
        None: a cosine decay to 5 % over the run's server epochs). A ``ServerTrainer`` carries its
        own (giving both is a ValueError).
    feature_shape : tuple[int, ...] | None (default: None)
        One sample's feature shape (other shapes are rejected); the trainer's when
        None, required with a bare server model.
    server_epochs, feature_dtype, fraction_train, fraction_evaluate, min_train_nodes, \
min_evaluate_nodes, min_available_nodes, seed, max_idle_rounds, query_timeout, \
max_reply_bytes, compression, max_feature_abs, max_logit_abs
        As the run-config options of the same name (``server-epochs``, ...).
    max_staleness : int | None (default: None)
        ``max-staleness`` in rounds; None: no limit (the run config's -1).
    freeze_extractor : bool (default: False)
        ``freeze-extractor``: the nodes keep their extractor fixed from the start.
    freeze_after : int | None (default: None)
        ``freeze-after``: frozen after this round; None: never (the run config's -1).
    on_round_end : Callable[[dict], None] | None (default: None)
        Called with each round's record once its evaluation is done.
    store : FeatureStore | None (default: None)
        Where features are kept (None: in memory; ``FeatureStore(directory)``: on disk).
    checkpoint_dir : str | Path | None (default: None)
        Where a checkpoint is written atomically after every round; None: none.
    global_sample_ids : bool (default: False)
        Sample ids are unique across all nodes (as in the built-in data sets).
    sample_ids : Callable[[str, str], np.ndarray | None] | None (default: None)
        Each node key's partition ids by split (None: no partition); an upload with
        ids outside it is rejected. None: ids are each node's own, kept per key.
    extractor : nn.Module | None (default: None)
        The frozen extractor every node shares (one seed, ``FedGKTClient(
        freeze_extractor=True)``); replies with another are rejected.
    time_budget : float (default: 0.0)
        ``time-budget``: no round starts after this many seconds (0: no limit).
    defences : Defences | None (default: None)
        The privacy defences (:class:`~flwr_fedgkt.privacy.Defences`) every node
        is asked to apply at least: what the server expects, for its accounting.
        A node's own setting is authoritative: it may apply more, never less
        than it is asked for; a reply that declares less is logged. Each round's
        record counts what the nodes say they applied (``privacy``).

    Notes
    -----
    The run's model is the deployable model with ``extractor`` (extractor, then
    server model: :func:`~flwr_fedgkt.models.extractor_and_server`, raw inputs to
    logits), else the server model: ``start(initial_arrays=...)`` (when not empty),
    the record ``evaluate_fn`` receives (round 0 included) and ``Result.arrays``
    are its ``state_dict``. ``start``'s ``train_config`` goes with every training
    Message (FedGKTClient reads ``client-epochs``, ``client-lr``, ``batch-size``,
    ``temperature``, ``alpha``).
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        trainer: ServerTrainer | nn.Module,
        server_epochs: int = DEFAULTS.server_epochs,
        feature_dtype: str = DEFAULTS.feature_dtype,
        feature_shape: tuple[int, ...] | None = None,
        fraction_train: float = DEFAULTS.fraction_train,
        fraction_evaluate: float = DEFAULTS.fraction_evaluate,
        min_train_nodes: int = DEFAULTS.min_train_nodes,
        min_evaluate_nodes: int = DEFAULTS.min_evaluate_nodes,
        min_available_nodes: int = DEFAULTS.min_available_nodes,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        max_reply_bytes: int = DEFAULTS.max_reply_bytes,
        max_staleness: int | None = None,
        store: FeatureStore | None = None,
        checkpoint_dir: str | Path | None = None,
        freeze_extractor: bool = DEFAULTS.freeze_extractor,
        freeze_after: int | None = None,
        compression: str = DEFAULTS.compression,
        max_feature_abs: float = DEFAULTS.max_feature_abs,
        max_logit_abs: float = DEFAULTS.max_logit_abs,
        global_sample_ids: bool = False,
        seed: int = DEFAULTS.seed,
        query_timeout: float = DEFAULTS.query_timeout,
        max_idle_rounds: int = DEFAULTS.max_idle_rounds,
        *,
        server_lr: float | None = None,
        server_batch_size: int | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: LRScheduleFactory | None = None,
        precision: str | None = None,
        device: str | None = None,
        server_average: float | None = None,
        extractor: nn.Module | None = None,
        sample_ids: SampleIds | None = None,
        time_budget: float = DEFAULTS.time_budget,
        defences: Defences | None = None,
    ) -> None:
        given: dict[str, Any] = {
            "server_lr": server_lr,
            "server_batch_size": server_batch_size,
            "temperature": temperature,
            "alpha": alpha,
            "optimizer": optimizer,
            "lr_schedule": lr_schedule,
            "precision": precision,
            "device": device,
            "server_average": server_average,
        }
        given = {k: v for k, v in given.items() if v is not None}
        training = {_SERVER_TRAINING[k]: v for k, v in given.items()}
        if isinstance(trainer, ServerTrainer):
            if given:
                names = ", ".join(given)
                raise ValueError(
                    f"{names}: give these to your ServerTrainer, or pass the bare server model"
                )
        elif feature_shape is not None:  # without it, the engine names what is missing
            trainer = ServerTrainer(model=trainer, feature_shape=feature_shape, **training)
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.query_timeout = query_timeout
        self.engine = RoundEngine(
            trainer,
            server_epochs=server_epochs,
            feature_dtype=feature_dtype,
            feature_shape=feature_shape,
            on_round_end=on_round_end,
            max_reply_bytes=max_reply_bytes,
            max_staleness=max_staleness,
            store=store,
            checkpoint_dir=checkpoint_dir,
            freeze_extractor=freeze_extractor,
            freeze_after=freeze_after,
            compression=compression,
            max_feature_abs=max_feature_abs,
            max_logit_abs=max_logit_abs,
            global_sample_ids=global_sample_ids,
            seed=seed,
            max_idle_rounds=max_idle_rounds,
            extractor_digest=None if extractor is None else module_digest(extractor),
            sample_ids=sample_ids,
            defences=defences,
        )
        self.extractor = extractor
        self.budget = TimeBudget(time_budget)
        self._grid: Grid | None = None
        self._sampled: dict[str, list[int]] = {}  # this round's sampled nodes, by phase
        self._tested: dict[int, Message] = {}  # training replies with their test upload
        self._sent_at = 0.0  # when the newest phase's messages were handed to Flower

    def summary(self) -> None:
        """Log FedGKT's settings."""
        log(
            INFO,
            "\t├──> Sampling: fraction train %.2f, evaluate %.2f | minimum nodes: train %d, "
            "evaluate %d, available %d",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_nodes,
            self.min_evaluate_nodes,
            self.min_available_nodes,
        )
        log_engine_summary(self.engine)

    # -- sampling ------------------------------------------------------------------
    def _connected(self) -> Collection[int]:
        return () if self._grid is None else set(self._grid.get_node_ids())

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Wait for enough nodes, then sample with the engine's seeded generator."""
        self._grid = grid
        self.engine.connected = self._connected
        size = sample_size(len(list(grid.get_node_ids())), fraction, minimum)
        if size == 0:
            return []
        node_ids = wait_for_nodes(grid, max(self.min_available_nodes, size))
        learn_keys(grid, self.engine, node_ids, self.query_timeout)
        return self.engine.members.sample(node_ids, size)

    def _accept(
        self,
        replies: Iterable[Message],
        server_round: int,
        training: bool,
        tested: Iterable[Message] = (),
    ) -> list[AcceptedReply]:
        """The replies that pass validation (and, for evaluation, the test uploads
        of the ``tested`` training replies); failed, missing and rejected nodes go
        into the round's log."""
        replies = list(replies)
        phase = "train" if training else "evaluate"
        self.engine.record_missing(
            server_round,
            self._sampled.get(phase, []),
            [msg.metadata.src_node_id for msg in replies],
        )
        readers = [MessageReply(msg, test=True) for msg in tested]
        accepted = []
        for msg in replies:
            if msg.has_error():
                self.engine.record_failure(server_round, msg.metadata.src_node_id, msg.error.reason)
            else:
                readers.append(MessageReply(msg))
        for reader in readers:
            if (reply := self.engine.accept(reader, server_round, training)) is not None:
                accepted.append(reply)
        return accepted

    def _messages(
        self, server_round: int, config: ConfigRecord, node_ids: list[int], training: bool
    ) -> list[Message]:
        """One instruction per node: the round's config, and (training) the node's
        own server logits."""
        log_ = self.engine.log_of(server_round)
        messages = []
        for node_id in node_ids:
            held, logits = self.engine.instructions(node_id, training=training)
            round_config = {**config, **self.engine.round_config(server_round, held)}
            if training:  # the test upload too, from the model the node trains now
                round_config["test-features"] = True
                round_config["held-test-features"] = self.engine.instructions(node_id, False)[0]
            content = RecordDict({CONFIG_KEY: ConfigRecord(round_config)})
            if logits is not None:
                content[LOGITS_KEY] = logits_record(*logits)
            log_.bytes_down += arrays_bytes(content)
            kind = MessageType.TRAIN if training else MessageType.EVALUATE
            messages.append(Message(content=content, message_type=kind, dst_node_id=node_id))
        return messages

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One Message per sampled node, each carrying that node's own server logits."""
        self.budget.check()  # BudgetSpent: no further round
        server_round += self.engine.round_offset
        self.engine.begin_round(server_round)
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self._sampled["train"] = node_ids
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        return self._sent(self._messages(server_round, config, node_ids, training=True))

    def _sent(self, messages: list[Message]) -> list[Message]:
        """The phase's messages, noting when they went out."""
        self._sent_at = time.perf_counter()
        return messages

    def _received(self, server_round: int, phase: str) -> None:
        """Count the wait for the replies of ``phase`` into the round's profile."""
        waited = time.perf_counter() - self._sent_at
        self.engine.log_of(server_round).spent(f"{phase}_wait", waited)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store the features, train the server model, refresh logits.

        Returns the trained server model's weights (``Result.arrays``; nothing is
        sent to the nodes) and the round's training metrics.
        """
        server_round += self.engine.round_offset
        self._received(server_round, "train")
        replies = self._keep_test_uploads(replies)
        accepted = self._accept(replies, server_round, training=True)
        metrics = self.engine.train_round(server_round, accepted)
        return self.model_arrays(), MetricRecord(dict(metrics))

    def model_arrays(self) -> ArrayRecord:
        """The run's model as an ArrayRecord (contiguous copies): with ``extractor``,
        the deployable model (:func:`~flwr_fedgkt.models.extractor_and_server`:
        ``extractor.*`` and ``server.*``), else the server model's ``state_dict``."""
        model = self.trainer.scored_model
        if self.extractor is not None:
            model = extractor_and_server(self.extractor, model)
        return ArrayRecord(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        )

    def _keep_test_uploads(self, replies: Iterable[Message]) -> list[Message]:
        """The training replies, with those that carry their node's test upload
        kept for this round's evaluation."""
        replies = list(replies)
        self._tested = {msg.metadata.src_node_id: msg for msg in replies if has_test_upload(msg)}
        return replies

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the features of their test split (but those whose
        training reply of this round carried them)."""
        server_round += self.engine.round_offset
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        tested = {node_id: self._tested[node_id] for node_id in node_ids if node_id in self._tested}
        self._tested = tested  # the sampled ones, scored in aggregate_evaluate
        node_ids = [node_id for node_id in node_ids if node_id not in tested]
        self._sampled["evaluate"] = node_ids
        return self._sent(self._messages(server_round, config, node_ids, training=False))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Score the server model on the test features; report edge accuracy too."""
        server_round += self.engine.round_offset
        self._received(server_round, "evaluate")
        tested, self._tested = self._tested.values(), {}
        accepted = self._accept(replies, server_round, training=False, tested=tested)
        metrics = self.engine.close_round(server_round, accepted)
        return None if metrics is None else MetricRecord(dict(metrics))

    # -- the run ---------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's ``Strategy.start``, with the server model's starting weights
        taken from ``initial_arrays`` (when it holds any) and its learning rate
        decaying over the run's server epochs (unless the trainer has a schedule)."""
        self.prepare(initial_arrays, num_rounds)
        first = len(self.engine.history)
        try:
            return super().start(
                prompt(grid),
                self.model_arrays(),
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        except BudgetSpent as spent:
            log(INFO, "The run ends: %s", spent)
            self.budget_spent()
            result = Result()
            complete_result(result, self, first)
            return result

    def budget_spent(self) -> None:
        """Finish what is open when the time budget ends the run (nothing here)."""

    @classmethod
    def face_settings(cls, config: RunConfig) -> dict[str, Any]:
        return {"time_budget": config.time_budget}

    def prepare(self, initial_arrays: ArrayRecord, num_rounds: int) -> None:
        """Before the first round: the server model's starting weights from
        ``initial_arrays`` (:func:`load_initial_arrays`) and its learning-rate
        horizon, the run's server epochs."""
        load_initial_arrays(self.trainer, initial_arrays, self.extractor)
        total_rounds = self.engine.round_offset + num_rounds
        self.trainer.decay_over(total_rounds * self.engine.server_epochs)


def load_initial_arrays(
    trainer: ServerTrainer, initial_arrays: ArrayRecord, extractor: nn.Module | None = None
) -> None:
    """Load ``initial_arrays`` into the server model when it holds any: a server
    model's ``state_dict``, or with ``extractor`` a deployable model's
    (:func:`~flwr_fedgkt.server_model.load_server_state`)."""
    if len(initial_arrays):
        load_server_state(trainer, initial_arrays.to_torch_state_dict(), extractor)
