"""FedGKT on Flower's legacy API: a ``NumPyClient`` and a legacy ``Strategy``.

Deployments built on ``ClientApp(client_fn=...)`` with a
:class:`flwr.client.NumPyClient` and ``ServerApp(server_fn=...)`` with a
:class:`flwr.server.strategy.Strategy` adopt FedGKT by returning
:class:`FedGKTNumPyClient` from their ``client_fn`` and :class:`LegacyFedGKT` from
their ``server_fn``. Both are faces over the same code as the Message-API apps: the
client runs the built-in node's round (:class:`flwr_fedgkt.node.EdgeNode`, edge state
in ``context.state`` and ``client-state-dir``, as the ClientApp keeps it), the
strategy holds the same :class:`flwr_fedgkt.rounds.RoundEngine` as
:class:`~flwr_fedgkt.strategy.FedGKT` (reply validation, server training, server
logits, scoring, round records).

What travels
------------
Server -> client, ``FitIns``
    ``parameters``: ``[ids, logits]``, the node's server logits keyed by sample id
    (``(N,)`` int64 and ``(N, K)`` float32); ``[]`` before the node's first round.
    ``config``: ``server-round`` and ``feature-dtype``.
Client -> server, ``FitRes`` (what :meth:`FedGKTNumPyClient.fit` returns)
    ``parameters``: the arrays named by :data:`FIT_ARRAYS`, in that order --
    ``features`` ``(N, 16, 32, 32)`` in the wire dtype (``float16``; ``bfloat16`` as
    its raw bits in ``int16``; ``uint8`` codes for ``int8``), ``logits`` ``(N, K)``
    float32, ``labels`` ``(N,)`` int64, ``ids`` ``(N,)`` int64 -- followed, for
    ``int8`` only, by :data:`INT8_ARRAYS` (``feature_scale``, ``feature_offset``,
    ``(16,)`` float32 each).
    ``num_examples``: ``N``. ``metrics``: ``server-round``, ``feature-dtype``,
    ``node-key``, ``train-loss``, ``train-accuracy``.
Server -> client, ``EvaluateIns``
    ``parameters``: ``[]``; ``config``: ``server-round`` and ``feature-dtype``.
Client -> server, ``EvaluateRes``
    ``loss``: the edge model's test loss; ``num_examples``: test samples.
    ``metrics``: ``server-round``, ``feature-dtype``, ``node-key``, ``edge-accuracy``,
    ``edge-loss`` and the test split's ``features``, ``labels``, ``ids`` (and for
    ``int8`` ``feature_scale``, ``feature_offset``) as ``.npy`` bytes under
    ``array.<name>``: a legacy ``EvaluateRes`` has no other room for arrays.

The server validates every reply exactly as the Message-API strategy does; a bad
reply is rejected with its reason in the round's record and touches neither the
feature store nor the server model.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import partial
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    NDArrays,
    Parameters,
    Scalar,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
)
from flwr.server import ServerAppComponents, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore import log
from torch import Tensor

from .accounting import model_profile
from .client import ContextStateStore
from .config import ConfigError, RunConfig
from .data import SampleSet, describe_dataset
from .edge import LogitTable, evaluate_metrics, train_metrics
from .features import PayloadError
from .node import EdgeNode, RoundInstructions, partition_node
from .records import QUERY_KEY
from .results import ResultsWriter
from .rounds import NODE_KEY, HoldsEngine, ReplyParts, RoundEngine, sample_size
from .server import ServerTrainer
from .server_app import default_output_dir

__all__ = [
    "FIT_ARRAYS",
    "INT8_ARRAYS",
    "EVALUATE_ARRAY_PREFIX",
    "FedGKTNumPyClient",
    "LegacyFedGKT",
    "samples_from_loader",
    "server_fn",
]

FIT_ARRAYS = ("features", "logits", "labels", "ids")
"""Names of the arrays a training reply carries, in their order in ``parameters``."""
INT8_ARRAYS = ("feature_scale", "feature_offset")
"""Arrays appended after :data:`FIT_ARRAYS` (and sent on evaluation) for ``int8``."""
EVALUATE_ARRAY_PREFIX = "array."
"""Prefix of the evaluation reply's metric keys that hold ``.npy`` bytes."""

_EVALUATE_ARRAYS = ("features", "labels", "ids")


def _array_names(names: Sequence[str], dtype: str) -> tuple[str, ...]:
    return tuple(names) + (INT8_ARRAYS if dtype == "int8" else ())


def _empty_parameters() -> Parameters:
    return Parameters(tensors=[], tensor_type="numpy.ndarray")


def _parameters_bytes(parameters: Parameters) -> int:
    return sum(len(tensor) for tensor in parameters.tensors)


def samples_from_loader(loader: Iterable[Sequence[Tensor]]) -> SampleSet:
    """Collect batches of ``(images, labels, sample_ids)`` into a :class:`SampleSet`.

    For a deployment whose data comes as a ``torch.utils.data.DataLoader``: its
    dataset must yield each sample's stable integer id (unique across all nodes) as
    the third item. The loader is read once, in its order; FedGKT shuffles by itself
    (seeded), so pass a loader without shuffling for reproducible runs.
    """
    images, labels, ids = [], [], []
    for batch in loader:
        if len(batch) != 3:
            raise ValueError(
                f"expected batches of (images, labels, sample_ids), got {len(batch)} items"
            )
        images.append(torch.as_tensor(batch[0], dtype=torch.float32))
        labels.append(torch.as_tensor(batch[1], dtype=torch.long))
        ids.append(torch.as_tensor(batch[2], dtype=torch.long))
    if not images:
        raise ValueError("the loader yielded no batches")
    return SampleSet(torch.cat(images), torch.cat(labels), torch.cat(ids))


class FedGKTNumPyClient(NumPyClient):
    """The FedGKT edge as a legacy ``NumPyClient``.

    ``fit`` runs one edge round exactly as the Message-API ClientApp does (restore
    the edge model and optimizer from ``context.state``, train with CE + KD against
    the server logits that came with the instructions, extract over the training
    split, save the state) and returns the features, logits, labels and sample ids
    (see the module docstring for their order). ``evaluate`` returns the test
    split's features and labels, and the edge model's own test loss and accuracy.
    Edge weights never leave the node. Training settings (``client-epochs``,
    ``batch-size``, ``client-lr``, ``temperature``, ``alpha``, ``seed``, ``device``)
    come from the run config, the ones in the server's ``config`` overriding it;
    the feature dtype and round from the server.

    Parameters
    ----------
    context : Context
        The ``Context`` that ``client_fn`` receives: its ``state`` keeps the edge
        model between rounds, its ``run_config`` holds the run's settings.
    train : SampleSet | Iterable[Sequence[Tensor]]
        The node's training split: a :class:`~flwr_fedgkt.data.SampleSet` or a loader
        of ``(images, labels, sample_ids)`` batches (see :func:`samples_from_loader`).
        Images are ``3 x 32 x 32`` float tensors.
    test : SampleSet | Iterable[Sequence[Tensor]]
        The node's test split, in the same form.
    num_classes : int
        Number of classes of the task.
    partition_id : int
        This node's index in the federation; it seeds the edge model's
        initialisation and its shuffling, so that nodes differ and runs repeat.
    node_key : str | None (default: None)
        The stable key the server keeps this node's state under; the partition id
        (as a string) when None.
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        context: Context,
        train: SampleSet | Iterable[Sequence[Tensor]],
        test: SampleSet | Iterable[Sequence[Tensor]],
        num_classes: int,
        partition_id: int,
        node_key: str | None = None,
    ) -> None:
        self.context = context
        self.node_key = str(partition_id) if node_key is None else node_key
        self.config = RunConfig.from_mapping(context.run_config)
        self.train_set = train if isinstance(train, SampleSet) else samples_from_loader(train)
        self.test_set = test if isinstance(test, SampleSet) else samples_from_loader(test)
        self.num_classes = num_classes
        self.partition_id = partition_id

    def _node(self) -> EdgeNode:
        """The node's round, its edge state in ``context.state`` (and
        ``client-state-dir``)."""
        store = ContextStateStore(self.context)
        return partition_node(self.config, self.partition_id, self.num_classes, store)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """This node's key (``node-key``), which the server asks for before the
        node's first round."""
        return {NODE_KEY: self.node_key}

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train the edge model one round; return features, logits, labels and ids.

        Parameters
        ----------
        parameters : NDArrays
            ``[ids, logits]``: this node's server logits by sample id, or ``[]``
            before its first round.
        config : dict[str, Scalar]
            ``server-round``, ``feature-dtype`` and ``freeze-extractor`` (the legacy
            client always sends its features whole and uncompressed).

        Returns
        -------
        tuple[NDArrays, int, dict[str, Scalar]]
            The arrays of :data:`FIT_ARRAYS` (plus :data:`INT8_ARRAYS` for ``int8``),
            the number of training samples, and ``server-round``, ``feature-dtype``,
            ``train-loss``, ``train-accuracy``.
        """
        ins = RoundInstructions.from_config(config, self.config.feature_dtype)
        server_round, dtype = ins.server_round, ins.dtype
        if len(parameters) not in (0, 2):
            raise ValueError(
                f"expected [] or [ids, logits] as parameters, got {len(parameters)} arrays"
            )
        teacher = LogitTable(parameters[0], parameters[1]) if parameters else None
        node = self._node()
        extracted, metrics = node.train(
            self.train_set, server_round, teacher, node.settings.for_round(config), ins.frozen
        )
        arrays = extracted.arrays(dtype, with_logits=True)  # always whole, uncompressed
        reply: dict[str, Scalar] = {
            "server-round": server_round,
            "feature-dtype": dtype,
            NODE_KEY: self.node_key,
        }
        reply.update(train_metrics(metrics))
        return (
            [arrays[name] for name in _array_names(FIT_ARRAYS, dtype)],
            len(self.train_set),
            reply,
        )

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Send the test split's features and labels; score the edge model locally.

        Returns
        -------
        tuple[float, int, dict[str, Scalar]]
            The edge model's test loss, the number of test samples, and
            ``server-round``, ``feature-dtype``, ``edge-accuracy``, ``edge-loss`` and
            the arrays as ``.npy`` bytes under ``array.<name>``.
        """
        ins = RoundInstructions.from_config(config, self.config.feature_dtype)
        server_round, dtype = ins.server_round, ins.dtype
        extracted, scores = self._node().evaluate(self.test_set, server_round)
        arrays = extracted.arrays(dtype, with_logits=False)
        reply: dict[str, Scalar] = {
            "server-round": server_round,
            "feature-dtype": dtype,
            NODE_KEY: self.node_key,
            **evaluate_metrics(scores),
        }
        for name in _array_names(_EVALUATE_ARRAYS, dtype):
            reply[EVALUATE_ARRAY_PREFIX + name] = ndarray_to_bytes(arrays[name])
        return float(scores["loss"]), len(self.test_set), reply


# -- server side --------------------------------------------------------------------
def _node_id(proxy: ClientProxy) -> int:
    node_id = getattr(proxy, "node_id", None)
    return int(node_id) if node_id is not None else int(proxy.cid)


def _fit_arrays(parameters: Parameters, dtype: str) -> dict[str, np.ndarray]:
    """The named arrays of a training reply (order: :data:`FIT_ARRAYS`)."""
    names = _array_names(FIT_ARRAYS, dtype)
    if len(parameters.tensors) != len(names):
        raise PayloadError(
            f"expected {len(names)} arrays ({', '.join(names)}) for {dtype!r} features, "
            f"got {len(parameters.tensors)}"
        )
    return {name: bytes_to_ndarray(t) for name, t in zip(names, parameters.tensors, strict=True)}


def _evaluate_arrays(metrics: Mapping[str, Scalar]) -> dict[str, np.ndarray]:
    """The named arrays of an evaluation reply (``array.<name>`` metrics)."""
    arrays = {}
    for key, value in metrics.items():
        if key.startswith(EVALUATE_ARRAY_PREFIX):
            if not isinstance(value, bytes):
                raise PayloadError(f"metric {key!r} holds {type(value).__name__}, not bytes")
            arrays[key[len(EVALUATE_ARRAY_PREFIX) :]] = bytes_to_ndarray(value)
    return arrays


class FitReply:
    """A legacy training reply, read as the engine reads replies."""

    def __init__(self, proxy: ClientProxy, res: FitRes, dtype: str) -> None:
        self.res, self.dtype = res, dtype
        self.node_id = _node_id(proxy)
        self.nbytes = _parameters_bytes(res.parameters)

    def read(self) -> ReplyParts:
        """Meta values and metrics from ``FitRes.metrics`` (``num-examples`` from
        ``FitRes.num_examples``), arrays from ``FitRes.parameters``."""
        metrics = {**self.res.metrics, "num-examples": self.res.num_examples}
        return self.res.metrics, _fit_arrays(self.res.parameters, self.dtype), metrics


class EvaluateReply:
    """A legacy evaluation reply, read as the engine reads replies."""

    def __init__(self, proxy: ClientProxy, res: EvaluateRes) -> None:
        self.res = res
        self.node_id = _node_id(proxy)
        self.nbytes = sum(
            len(v)
            for k, v in res.metrics.items()
            if k.startswith(EVALUATE_ARRAY_PREFIX) and isinstance(v, bytes)
        )

    def read(self) -> ReplyParts:
        """Meta values and metrics from ``EvaluateRes.metrics``, arrays from its
        ``array.<name>`` entries."""
        metrics = {**self.res.metrics, "num-examples": self.res.num_examples}
        return self.res.metrics, _evaluate_arrays(self.res.metrics), metrics


class LegacyFedGKT(HoldsEngine, Strategy):
    """Group Knowledge Transfer as a legacy ``flwr.server.strategy.Strategy``.

    The drop-in for ``FedAvg`` in a ``ServerApp(server_fn=...)``: ``configure_fit``
    gives every sampled client its own ``FitIns`` with its own server logits;
    ``aggregate_fit`` validates each reply, stores the features, trains the server
    model and computes fresh server logits per client; ``configure_evaluate`` /
    ``aggregate_evaluate`` score the server model on the clients' test features and
    report the edge model's own accuracy. No global model exists: the ``Parameters``
    the legacy ``Server`` carries between rounds stay empty. The server-side work is
    the :class:`~flwr_fedgkt.rounds.RoundEngine`'s, which the Message-API
    :class:`~flwr_fedgkt.strategy.FedGKT` holds too.

    Implementation based on https://arxiv.org/abs/2007.14513

    Parameters
    ----------
    trainer : ServerTrainer
        The server-side large model with its optimizer; trained inside
        ``aggregate_fit``.
    fraction_train : float (default: 1.0)
        Fraction of clients sampled for training (``fraction_fit`` in ``FedAvg``).
    fraction_evaluate : float (default: 1.0)
        Fraction of clients sampled for evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of clients sampled for training (``min_fit_clients``).
    min_evaluate_nodes : int (default: 2)
        Minimum number of clients sampled for evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected clients before a round starts.
    query_timeout : float (default: 300.0)
        Seconds to wait for a new client's key (``get_properties``).
    **engine_settings
        The round engine's settings, as documented on
        :class:`~flwr_fedgkt.strategy.FedGKT` (``server_epochs``, ``feature_dtype``,
        ``feature_shape``, ``on_round_end``, ``max_reply_bytes``, ``max_staleness``,
        ``max_feature_abs``, ``global_sample_ids``, ``seed``, ...).
    """

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        trainer: ServerTrainer,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        query_timeout: float = 300.0,
        **engine_settings: Any,
    ) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.query_timeout = query_timeout
        engine_settings.setdefault("compression", "none")  # legacy clients send whole arrays
        self.engine = RoundEngine(trainer, **engine_settings)
        self._client_manager: ClientManager | None = None

    @classmethod
    def face_settings(cls, config: RunConfig) -> dict[str, Any]:
        """``compression = "none"``: the legacy client sends its arrays whole, so
        the strategy announces no codec. ``pipeline`` is a Message-API feature
        (the legacy Server runs a round's fit and evaluate in order; said in the
        log when set)."""
        if config.pipeline:
            log(WARNING, "pipeline is not available on the legacy API: rounds run in order")
        return {"compression": "none"}

    def __repr__(self) -> str:
        return (
            f"LegacyFedGKT(server_model={self.trainer.model_name!r}, "
            f"feature_dtype={self.engine.feature_dtype!r}, "
            f"server_epochs={self.engine.server_epochs})"
        )

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """No global model: empty parameters (and the strategy's summary in the log)."""
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        self.engine.summary()
        return _empty_parameters()

    def _connected(self) -> Collection[int]:
        if self._client_manager is None:
            return ()
        return {_node_id(proxy) for proxy in self._client_manager.all().values()}

    def _sample(
        self, client_manager: ClientManager, fraction: float, minimum: int
    ) -> list[ClientProxy]:
        """Wait for enough clients, then sample with the engine's seeded generator."""
        self._client_manager = client_manager
        self.engine.connected = self._connected
        size = sample_size(client_manager.num_available(), fraction, minimum)
        if size == 0:
            return []
        client_manager.wait_for(max(self.min_available_nodes, size), timeout=86400)
        proxies = {_node_id(proxy): proxy for proxy in client_manager.all().values()}
        self._learn_keys(proxies)
        return [proxies[node_id] for node_id in self.engine.sample(proxies, size)]

    def _learn_keys(self, proxies: Mapping[int, ClientProxy]) -> None:
        """Ask the clients whose key the server does not know for it
        (``get_properties``; :meth:`FedGKTNumPyClient.get_properties` answers), so
        that clients are sampled by key and a resumed run's first round sends every
        client its server logits. A client that cannot answer is not asked again."""
        for node_id in self.engine.keys_to_ask(proxies):
            ins = GetPropertiesIns(config={QUERY_KEY: NODE_KEY})
            try:
                res = proxies[node_id].get_properties(ins, timeout=self.query_timeout, group_id=0)
            except Exception as err:  # a client that cannot answer: sampled by node id
                log(INFO, "node %d did not say its key: %s", node_id, err)
                self.engine.no_key([node_id])
                continue
            if res.status.code != Code.OK or NODE_KEY not in res.properties:
                self.engine.no_key([node_id])
                continue
            self.engine.learn_key(node_id, res.properties[NODE_KEY])

    # -- training ------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One ``FitIns`` per sampled client, each with that client's server logits."""
        round_log = self.engine.begin_round(server_round)
        clients = self._sample(client_manager, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_fit: sampled %d nodes", len(clients))
        instructions = []
        for proxy in clients:
            _, logits = self.engine.instructions(_node_id(proxy), training=True)
            fit_parameters = _empty_parameters()
            if logits is not None:
                ids, values = logits
                fit_parameters = ndarrays_to_parameters(
                    [ids.astype(np.int64), values.astype(np.float32)]
                )
            round_log.bytes_down += _parameters_bytes(fit_parameters)
            config: dict[str, Scalar] = self.engine.round_config(server_round)
            instructions.append((proxy, FitIns(parameters=fit_parameters, config=config)))
        return instructions

    def _record_failures(self, failures: Sequence[tuple[ClientProxy, Any] | BaseException]) -> None:
        for failure in failures:
            if isinstance(failure, BaseException):
                self.engine.record_failure(None, f"{type(failure).__name__}: {failure}")
            else:
                proxy, res = failure
                self.engine.record_failure(_node_id(proxy), res.status.message)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and store the features, train the server model, refresh logits."""
        self._record_failures(failures)
        replies = sorted(
            (FitReply(proxy, res, self.engine.feature_dtype) for proxy, res in results),
            key=lambda reply: reply.node_id,
        )
        accepted = [
            reply
            for reply in (self.engine.accept(r, server_round, training=True) for r in replies)
            if reply is not None
        ]
        metrics = self.engine.train_round(server_round, accepted)
        return None, dict(metrics)

    # -- evaluation ----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Ask sampled clients for the features of their test split."""
        clients = self._sample(client_manager, self.fraction_evaluate, self.min_evaluate_nodes)
        if not clients:
            # the legacy Server calls no aggregate_evaluate then: close the round here
            self.engine.close_round(server_round, [])
            return []
        config: dict[str, Scalar] = self.engine.round_config(server_round)
        return [
            (proxy, EvaluateIns(parameters=_empty_parameters(), config=dict(config)))
            for proxy in clients
        ]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Score the server model on the test features; report edge accuracy too."""
        self._record_failures(failures)
        replies = sorted(
            (EvaluateReply(proxy, res) for proxy, res in results), key=lambda r: r.node_id
        )
        accepted = [
            reply
            for reply in (self.engine.accept(r, server_round, training=False) for r in replies)
            if reply is not None
        ]
        metrics = self.engine.close_round(server_round, accepted)
        if metrics is None:
            return None, {}
        return float(metrics["loss"]), dict(metrics)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the server model is scored in
        ``aggregate_evaluate`` on the clients' test features."""
        return None


def _write_round(writer: ResultsWriter, num_rounds: int, record: dict[str, Any]) -> None:
    """Write a round's record; after the last round, mark the run completed."""
    writer(record)
    if record["round"] >= num_rounds:
        writer.finish("completed")


def server_fn(context: Context) -> ServerAppComponents:
    """The legacy ServerApp's components, configured from the run config.

    :class:`LegacyFedGKT` with the same server model, optimizer and schedule as the
    Message-API ServerApp, writing the same ``results.json`` to ``output-dir``; the
    ``ServerConfig`` runs ``num-server-rounds`` rounds of at most ``round-timeout``
    seconds. Use as ``ServerApp(server_fn=server_fn)``.
    """
    config = RunConfig.from_mapping(context.run_config)
    if config.resume_from:  # the legacy Server numbers rounds from 1 in every run
        raise ConfigError(
            "resume-from: the legacy-API ServerApp cannot resume a run; resume with the "
            "Message-API ServerApp (flwr_fedgkt.server_app), which reads the same checkpoints"
        )
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir()
    num_classes = describe_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed
    ).num_classes
    header = {
        "algorithm": "fedgkt",
        "flower_api": "legacy",
        "config": config.to_dict(),
        "edge_model": model_profile("resnet8", num_classes),
        "server_model": model_profile(config.server_model, num_classes),
    }
    writer = ResultsWriter(output_dir, header)
    log(INFO, "FedGKT results go to %s", writer.path)
    strategy = LegacyFedGKT.from_run_config(
        config,
        num_classes,
        output_dir,
        on_round_end=partial(_write_round, writer, config.num_server_rounds),
    )
    server_config = ServerConfig(
        num_rounds=config.num_server_rounds, round_timeout=config.round_timeout
    )
    return ServerAppComponents(strategy=strategy, config=server_config)
