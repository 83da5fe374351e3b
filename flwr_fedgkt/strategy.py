"""FedGKT as a Flower strategy on the Message API.

No weights are averaged. Each round:

1. ``configure_train`` sends every sampled node its *own* server logits (none in
   its first round) and the round's config;
2. ``aggregate_train`` validates each reply, stores the valid ones' features, trains
   the large server model on all stored features and computes fresh server logits
   for each node that replied;
3. ``configure_evaluate``/``aggregate_evaluate`` score the server model on the
   nodes' test-split features and collect the edge model's own accuracy.

A reply that fails validation is rejected with its reason (in the log and in the
round's record) and touches neither the feature store nor the server model.

With ``pipeline=True`` the server trains round t's features in a background
thread while round t's evaluation and round t+1's edge training go on: round
t+1's nodes get the newest server logits that are ready (one round older), and
round t is scored and recorded (log line, ``on_round_end``, checkpoint) once its
server training has finished, when round t+1's uploads arrive (the last round at
once). ``start`` is overridden for this only: it notes the last round, runs
Flower's own loop, then completes the returned ``Result`` with each round's
metrics and the final model, which Flower's loop cannot know in time.

The strategy only translates Flower Messages: everything else a round does on the
server (validation, server training, scoring, the round's log, checkpoints) is
:class:`flwr_fedgkt.rounds.RoundEngine`'s, which the strategy holds and which the
legacy-API strategy (:class:`flwr_fedgkt.compat.LegacyFedGKT`) holds too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import nn

from .config import RunConfig
from .features import MAX_FEATURE_ABS, MAX_LOGIT_ABS, FeatureStore, PayloadError
from .node import check_node_data
from .records import (
    CONFIG_KEY,
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    NODE_KEY,
    QUERY_KEY,
    arrays_bytes,
    logits_record,
    record_arrays,
)
from .rounds import (
    AcceptedReply,
    HoldsEngine,
    ReplyParts,
    RoundEngine,
    TrainingJob,
    sample_size,
)
from .server import ServerTrainer
from .training import LRScheduleFactory, OptimizerFactory

__all__ = ["FedGKT", "MessageReply", "federation_data", "wait_for_nodes"]


class MessageReply:
    """A reply Message, read as the engine reads replies (:class:`ReplyReader`)."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.node_id = msg.metadata.src_node_id
        self.nbytes = arrays_bytes(msg.content)

    def read(self) -> ReplyParts:
        """The meta values, arrays (the uploaded features as views of the message's
        bytes) and metrics; a missing record raises PayloadError.

        Records and arrays other than those in :mod:`flwr_fedgkt.records` are ignored.
        """
        content = self.msg.content
        for key, records, kind in (
            (FEATURES_KEY, content.array_records, "ArrayRecord"),
            (META_KEY, content.config_records, "ConfigRecord"),
            (METRICS_KEY, content.metric_records, "MetricRecord"),
        ):
            if key not in records:
                raise PayloadError(f"missing {kind} {key!r}")
        arrays = record_arrays(content.array_records[FEATURES_KEY], views=("features",))
        return content.config_records[META_KEY], arrays, content.metric_records[METRICS_KEY]


# pylint: disable=too-many-instance-attributes
def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    """The ids of the connected nodes, once at least ``minimum`` are connected
    (a log line every second while waiting)."""
    while len(node_ids := list(grid.get_node_ids())) < minimum:
        log(
            INFO,
            "Waiting for nodes to connect: %d connected (minimum required: %d).",
            len(node_ids),
            minimum,
        )
        time.sleep(1)
    return node_ids


def federation_data(grid: Grid, config: RunConfig) -> tuple[int, str]:
    """Before a run: wait for ``min-available-nodes`` nodes, then check that the
    run's data set splits into one partition per connected node
    (:func:`~flwr_fedgkt.node.check_node_data`). The number of nodes and a line
    saying how the data splits; :class:`~flwr_fedgkt.data.PartitionError` or
    :class:`~flwr_fedgkt.data.DataUnavailableError` when it does not."""
    num_nodes = len(wait_for_nodes(grid, max(config.min_available_nodes, 1)))
    return num_nodes, check_node_data(config, num_nodes)


PIPELINE_TRAIN_METRICS = {
    "num-examples": "train_samples",
    "replies": "train_nodes",
    "server-train-loss": "server_train_loss",
    "server-train-ce": "server_train_ce",
    "server-train-kd": "server_train_kd",
    "server-train-accuracy": "server_train_accuracy",
    "server-train-seconds": "server_train_seconds",
}
"""The training metrics of a pipelined round's ``Result`` entry, from its record."""


class FedGKT(HoldsEngine, Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) as a Flower strategy.

    Implementation based on https://arxiv.org/abs/2007.14513

    Parameters
    ----------
    trainer : ServerTrainer | nn.Module
        The server-side large model with its optimizer and training settings
        (a :class:`~flwr_fedgkt.server.ServerTrainer`), trained inside
        ``aggregate_train``; or just the server model (any module that maps a
        batch of features to logits), trained with the settings below.
    server_lr : float | None (default: None)
        Learning rate of the server model's optimizer (0.001 when None).
    server_batch_size : int | None (default: None)
        Server training batch size (64 when None).
    temperature : float | None (default: None)
        KD temperature of the server's loss (3.0 when None).
    alpha : float | None (default: None)
        Weight of the server's KD term: ``loss = CE + alpha * KD`` (1.0 when None).
    optimizer : OptimizerFactory | None (default: None)
        Builds the optimizer from the server model's parameters (its learning rate
        is set to ``server_lr``); Adam with weight decay 5e-4 when None.
    lr_schedule : LRScheduleFactory | None (default: None)
        Builds the learning-rate schedule from the optimizer, stepped after every
        server epoch (e.g. ``lambda opt: StepLR(opt, 10, 0.5)``); when None the
        rate is halved whenever the training loss stalls for 3 rounds.
    precision : str | None (default: None)
        Server training and inference precision: ``float32`` (when None),
        ``bfloat16``, ``float16`` or ``auto`` (see :mod:`flwr_fedgkt.precision`).
    device : str | None (default: None)
        ``auto`` (when None: CUDA when available), ``cpu``, ``cuda``, ...
        These six settings and ``optimizer``/``lr_schedule`` are for a bare server
        model; a ``ServerTrainer`` carries its own (giving both is a ValueError).
    server_epochs : int (default: 1)
        Epochs of server training per round over all stored features.
    feature_dtype : str (default: "float32")
        Wire dtype the clients encode features in: float32, float16, bfloat16, int8.
    feature_shape : tuple[int, ...] | None (default: None)
        Shape of one sample's features; replies with another shape are rejected.
        The trainer's ``feature_shape`` when None (16 x 32 x 32 for the built-in
        models); required with a bare server model.
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before a round starts.
    seed : int (default: 0)
        Seeds node sampling: with the same node keys (or node ids, for nodes that
        do not say their key), every run samples the same nodes in every round.
    max_idle_rounds : int (default: 3)
        After this many rounds in a row in which no node replied usefully (every
        sampled node failed or was rejected), ``start()`` raises
        :class:`~flwr_fedgkt.rounds.NoProgressError` naming the reasons with their
        counts; 0: never stop.
    pipeline : bool (default: False)
        Train the server model in the background while the nodes evaluate and
        train the next round (``pipeline``); nodes distil from server logits one
        round older. See the module docstring.
    query_timeout : float (default: 300.0)
        Seconds to wait for the nodes' answers when the strategy asks new nodes
        for their keys (before the first round in which they are sampled).
    on_round_end : Callable[[dict], None] | None (default: None)
        Called with each round's record once the round's evaluation is done (the
        ServerApp writes ``results.json`` there).
    max_reply_bytes : int (default: 0)
        Replies whose ArrayRecords exceed this many bytes are rejected; 0: no limit.
    max_staleness : int | None (default: None)
        Train on the stored features of every node seen within this many rounds
        (stale ones included); older ones are dropped. None: keep them all.
    store : FeatureStore | None (default: None)
        Where features are kept; a new in-memory store when None (pass
        ``FeatureStore(directory)`` for memory-mapped files).
    checkpoint_dir : str | Path | None (default: None)
        Where a checkpoint is written atomically after every round; None: none.
    freeze_extractor : bool (default: False)
        The clients keep their edge extractor fixed from the start
        (``freeze-extractor``; the same as ``freeze_after=0``), so their features
        never change: a node uploads them the first time it takes part and later
        replies carry only sample ids and logits.
    freeze_after : int | None (default: None)
        The clients train their edge extractor in rounds 1 to ``freeze_after``
        and keep it fixed from then on (``freeze-after``; each round's config says
        ``freeze-extractor``); None: never freeze. Not with ``freeze_extractor``.
    compression : str (default: "zstd")
        Codec of the uploaded feature bytes, announced in every round's config:
        ``zstd`` (lossless, about 2x on int8 edge features;
        :mod:`flwr_fedgkt.compression`) or ``none``. A reply may use ``none`` or
        the announced codec, so ClientApps that do not compress still work.
    max_feature_abs : float (default: 1e4)
        Bound on the magnitude of a decoded feature value; replies beyond it are
        rejected. Far above the ResNet-8 stem's activations on normalised images
        (below 7 measured); raise it for models whose features are larger.
    max_logit_abs : float (default: 1e4)
        Bound on the magnitude of an edge logit; replies beyond it are rejected.
    global_sample_ids : bool (default: False)
        Sample ids are unique across all nodes (as in the built-in data sets): a
        sample id that one node key holds cannot be uploaded under another. Leave
        False when each node numbers its own samples.

    Every reply names its node's stable key in its ``meta`` record
    (``node-key``); the server keeps features, server logits and staleness per
    key, so a node that reconnects under a new Flower node id continues where
    it was (see :class:`flwr_fedgkt.registry.NodeRegistry`).

    Only what changed travels: the server keeps every node's newest training
    features (in ``store``) and test features (in memory) and names their
    digest in each instruction (``held-features``); a node whose features have
    that digest (a frozen or untrained extractor) sends only ids and logits. A
    node whose features were dropped (``max_staleness``) sends them again.

    The ``train_config`` given to ``start()`` goes out with every training
    Message, as with FedAvg. :class:`~flwr_fedgkt.client.FedGKTClient` reads its
    ``client-epochs``, ``client-lr``, ``batch-size``, ``temperature`` and
    ``alpha`` (each overriding the client's own setting for that round); other
    keys are left to the user's ClientApp.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(
        self,
        trainer: ServerTrainer | nn.Module,
        server_epochs: int = 1,
        feature_dtype: str = "float32",
        feature_shape: tuple[int, ...] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        on_round_end: Callable[[dict[str, Any]], None] | None = None,
        max_reply_bytes: int = 0,
        max_staleness: int | None = None,
        store: FeatureStore | None = None,
        checkpoint_dir: str | Path | None = None,
        freeze_extractor: bool = False,
        freeze_after: int | None = None,
        compression: str = "zstd",
        max_feature_abs: float = MAX_FEATURE_ABS,
        max_logit_abs: float = MAX_LOGIT_ABS,
        global_sample_ids: bool = False,
        seed: int = 0,
        query_timeout: float = 300.0,
        max_idle_rounds: int = 3,
        pipeline: bool = False,
        *,
        server_lr: float | None = None,
        server_batch_size: int | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: LRScheduleFactory | None = None,
        precision: str | None = None,
        device: str | None = None,
    ) -> None:
        given: dict[str, tuple[str, Any]] = {  # ServerTrainer's name: (argument, value)
            "lr": ("server_lr", server_lr),
            "batch_size": ("server_batch_size", server_batch_size),
            "temperature": ("temperature", temperature),
            "alpha": ("alpha", alpha),
            "optimizer": ("optimizer", optimizer),
            "lr_schedule": ("lr_schedule", lr_schedule),
            "precision": ("precision", precision),
            "device": ("device", device),
        }
        training: dict[str, Any] = {k: v for k, (_, v) in given.items() if v is not None}
        if isinstance(trainer, ServerTrainer):
            if training:
                names = ", ".join(given[key][0] for key in training)
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
        )
        self.query_timeout = query_timeout
        self.pipeline = pipeline
        self._training: tuple[TrainingJob, Future[None]] | None = None  # pipeline
        self._to_score: list[AcceptedReply] = []  # the open round's test replies
        self._last_round = 0
        self._grid: Grid | None = None
        self._sampled: dict[str, list[int]] = {}  # this round's sampled nodes, by phase

    @classmethod
    def face_settings(cls, config: RunConfig) -> dict[str, Any]:
        """``pipeline`` from the run config."""
        return {"pipeline": config.pipeline}

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Sampling:")
        log(
            INFO,
            "\t│\t├──Fraction: train (%.2f) | evaluate ( %.2f)",
            self.fraction_train,
            self.fraction_evaluate,
        )
        log(
            INFO,
            "\t│\t├──Minimum nodes: train (%d) | evaluate (%d)",
            self.min_train_nodes,
            self.min_evaluate_nodes,
        )
        log(INFO, "\t│\t└──Minimum available nodes: %d", self.min_available_nodes)
        log(INFO, "\t├──> Pipelined rounds: %s", "yes" if self.pipeline else "no")
        self.engine.summary()

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
        self._learn_keys(grid, node_ids)
        return self.engine.sample(node_ids, size)

    def _learn_keys(self, grid: Grid, node_ids: Collection[int]) -> None:
        """Ask the nodes whose key the server does not know for it (a ``query``
        Message; :meth:`FedGKTClient.query <flwr_fedgkt.client.FedGKTClient.query>`
        answers it), so that nodes are sampled by key and a resumed run's first
        round sends every node its server logits. A node that cannot answer (a
        ClientApp without a query handler) is not asked again; it gets its key
        bound by its first training reply, as before."""
        unknown = self.engine.keys_to_ask(node_ids)
        if not unknown:
            return
        messages = [
            Message(
                content=RecordDict({CONFIG_KEY: ConfigRecord({QUERY_KEY: NODE_KEY})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in unknown
        ]
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error() or META_KEY not in reply.content.config_records:
                continue
            answered.add(node_id)
            self.engine.learn_key(node_id, reply.content.config_records[META_KEY].get(NODE_KEY))
        self.engine.no_key(set(unknown) - answered)
        log(INFO, "node keys: %d asked, %d answered", len(unknown), len(answered))

    def _replies(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """The replies that carry content; failed and missing nodes are recorded."""
        replies = list(replies)
        self.engine.record_missing(
            self._sampled.get(phase, []), [msg.metadata.src_node_id for msg in replies]
        )
        valid = []
        for msg in replies:
            if msg.has_error():
                self.engine.record_failure(msg.metadata.src_node_id, msg.error.reason)
            else:
                valid.append(msg)
        return valid

    def _accept(
        self, replies: Iterable[Message], server_round: int, training: bool
    ) -> list[AcceptedReply]:
        accepted = []
        for msg in self._replies(replies, "train" if training else "evaluate"):
            reply = self.engine.accept(MessageReply(msg), server_round, training)
            if reply is not None:
                accepted.append(reply)
        return accepted

    # -- training ------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One Message per sampled node, each carrying that node's own server logits."""
        server_round += self.engine.round_offset
        log_ = self.engine.begin_round(server_round)
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        self._sampled["train"] = node_ids
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        messages = []
        for node_id in node_ids:
            held, logits = self.engine.instructions(node_id, training=True)
            round_config = {**config, **self.engine.round_config(server_round, held)}
            content = RecordDict({CONFIG_KEY: ConfigRecord(round_config)})
            if logits is not None:
                content[LOGITS_KEY] = logits_record(*logits)
            log_.bytes_down += arrays_bytes(content)
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store the features, train the server model, refresh logits.

        Returns the trained server model's weights (so ``start()``'s ``Result.arrays``
        holds the final server model; nothing is sent to the nodes) and the round's
        training metrics.
        """
        server_round += self.engine.round_offset
        if self.pipeline:
            # the round before first (its training, then its scores), so that these
            # replies are validated against the store as that training left it
            self._close_pending()
            accepted = self._accept(replies, server_round, training=True)
            job = self.engine.start_training(server_round, accepted)
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgkt-server")
            self._training = (job, executor.submit(self.engine.run_training, job))
            executor.shutdown(wait=False)
            return None, None  # this round's model and metrics are not ready yet
        accepted = self._accept(replies, server_round, training=True)
        metrics = self.engine.train_round(server_round, accepted)
        return self.server_arrays(), MetricRecord(dict(metrics))

    def _close_pending(self) -> dict[str, float] | None:
        """Wait for the pending server training (``pipeline``), then finish it and
        score and close its round; that round's evaluation metrics."""
        if self._training is None:
            return None
        job, future = self._training
        self._training = None
        future.result()  # re-raises what the training raised
        self.engine.finish_training(job)
        with self.engine.logging_to(job.log):
            return self.engine.close_round(job.server_round, self._to_score)

    def server_arrays(self) -> ArrayRecord:
        """The server model's ``state_dict`` as an ArrayRecord (contiguous copies)."""
        state = {
            k: v.detach().cpu().contiguous() for k, v in self.trainer.model.state_dict().items()
        }
        return ArrayRecord(state)

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the features of their test split."""
        server_round += self.engine.round_offset
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self._sampled["evaluate"] = node_ids
        messages = []
        for node_id in node_ids:
            held, _ = self.engine.instructions(node_id, training=False)
            round_config = {**config, **self.engine.round_config(server_round, held)}
            messages.append(
                Message(
                    content=RecordDict({CONFIG_KEY: ConfigRecord(round_config)}),
                    message_type=MessageType.EVALUATE,
                    dst_node_id=node_id,
                )
            )
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Score the server model on the test features; report edge accuracy too."""
        server_round += self.engine.round_offset
        accepted = self._accept(replies, server_round, training=False)
        if self.pipeline:
            self._to_score = accepted
            if server_round < self._last_round:
                return None  # scored once the round's server training is done
            metrics = self._close_pending()
        else:
            metrics = self.engine.close_round(server_round, accepted)
        return None if metrics is None else MetricRecord(dict(metrics))

    # -- the pipelined run ------------------------------------------------------------
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
        """Flower's ``Strategy.start``; with ``pipeline``, the last round is noted
        before and the ``Result`` completed after (each round's training and
        evaluation metrics, the final server model). ``evaluate_fn`` needs the
        model of every round in turn, so it cannot be used with ``pipeline``."""
        if not self.pipeline:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        if evaluate_fn is not None:
            raise ValueError("evaluate_fn needs each round's model in turn: not with pipeline")
        self._last_round = self.engine.round_offset + num_rounds
        first = len(self.engine.history)
        try:
            result = super().start(
                grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config
            )
        finally:
            if self._training is not None:  # a round failed: let its training end
                self._training[1].exception()
                self._training = None
        result.arrays = self.server_arrays()
        for record in self.engine.history[first:]:
            server_round = int(record["round"]) - self.engine.round_offset
            result.train_metrics_clientapp[server_round] = MetricRecord(
                {
                    key: float(record[field])
                    for key, field in PIPELINE_TRAIN_METRICS.items()
                    if record.get(field) is not None
                }
            )
            if record.get("accuracy") is not None:
                result.evaluate_metrics_clientapp[server_round] = MetricRecord(
                    {
                        "num-examples": float(record["eval_samples"]),
                        "accuracy": float(record["accuracy"]),
                        "loss": float(record["loss"]),
                    }
                )
        return result
