"""Group Knowledge Transfer as a legacy ``flwr.server.strategy.Strategy``:
:class:`LegacyFedGKT`."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesIns,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.supercore import log
from torch import nn

from ..faces import HoldsEngine, log_engine_summary
from ..records import QUERY_KEY
from ..rounds import RoundEngine, sample_size
from ..server import ServerTrainer
from ..settings import DEFAULTS, RunConfig
from ..validation import NODE_KEY
from .fedavg_names import takes_fedavg_names
from .wire import EvaluateReply, FitReply, empty_parameters, node_id, parameters_bytes

__all__ = ["ConfigFn", "EvaluateFn", "LegacyFedGKT"]

EvaluateFn = Callable[
    [int, list[np.ndarray], dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None
]
"""``FedAvg``'s ``evaluate_fn``: (round, the model's arrays, config) to (loss, metrics)."""

ConfigFn = Callable[[int], Mapping[str, Scalar]]
"""``FedAvg``'s ``on_fit_config_fn`` / ``on_evaluate_config_fn``: a round's extra
config entries, from its number."""


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

    ``FedAvg``'s argument names are taken where they mean the same (``fraction_fit``,
    ``min_fit_clients``, ``min_evaluate_clients``, ``min_available_clients``, and
    ``fraction_evaluate``, ``on_fit_config_fn``, ``on_evaluate_config_fn`` and
    ``evaluate_fn`` as they are); ``FedAvg``'s other arguments
    (``initial_parameters``, ``accept_failures``, ``fit_metrics_aggregation_fn``,
    ...) are a ``TypeError`` that says why FedGKT has no meaning for them.

    Implementation based on https://arxiv.org/abs/2007.14513

    Parameters
    ----------
    trainer : ServerTrainer | nn.Module
        The server-side large model with its optimizer, trained inside
        ``aggregate_fit``; or the bare server model, trained with the defaults
        of :class:`~flwr_fedgkt.server.ServerTrainer` (then give
        ``feature_shape``, the shape of one sample's features).
    fraction_train : float (default: 1.0)
        Fraction of clients sampled for training (``fraction_fit`` in ``FedAvg``).
    fraction_evaluate : float (default: 1.0)
        Fraction of clients sampled for evaluation.
    min_train_nodes : int (default: 2)
        Minimum number of clients sampled for training (``min_fit_clients``).
    min_evaluate_nodes : int (default: 2)
        Minimum number of clients sampled for evaluation (``min_evaluate_clients``).
    min_available_nodes : int (default: 2)
        Minimum number of connected clients before a round starts
        (``min_available_clients``).
    query_timeout : float (default: 300.0)
        Seconds to wait for a new client's key (``get_properties``).
    on_fit_config_fn : ConfigFn | None (default: None)
        As in ``FedAvg``: the entries it returns for a round go into every
        ``FitIns.config`` of that round, next to FedGKT's own (which win a clash).
        :class:`~flwr_fedgkt.legacy.FedGKTNumPyClient` takes ``client-epochs``,
        ``client-lr``, ``batch-size``, ``temperature`` and ``alpha`` from them.
    on_evaluate_config_fn : ConfigFn | None (default: None)
        As in ``FedAvg``, for every ``EvaluateIns.config``.
    evaluate_fn : EvaluateFn | None (default: None)
        As in ``FedAvg``: ``evaluate_fn(server_round, ndarrays, config)`` scores the
        server's model centrally (round 0: before any training) and returns
        ``(loss, metrics)`` or None. ``ndarrays`` are the server model's
        ``state_dict`` values in order (load them with
        ``model.load_state_dict(dict(zip(model.state_dict(), ndarrays)))``); it
        maps features to logits, so put the nodes' shared extractor in front of it
        to score raw inputs.
    **engine_settings
        The round engine's settings, as documented on
        :class:`~flwr_fedgkt.strategy.FedGKT` (``server_epochs``, ``feature_dtype``,
        ``feature_shape``, ``on_round_end``, ``max_reply_bytes``, ``max_staleness``,
        ``max_feature_abs``, ``global_sample_ids``, ``seed``, ...).
    """

    # pylint: disable=too-many-arguments
    @takes_fedavg_names
    def __init__(
        self,
        trainer: ServerTrainer | nn.Module,
        fraction_train: float = DEFAULTS.fraction_train,
        fraction_evaluate: float = DEFAULTS.fraction_evaluate,
        min_train_nodes: int = DEFAULTS.min_train_nodes,
        min_evaluate_nodes: int = DEFAULTS.min_evaluate_nodes,
        min_available_nodes: int = DEFAULTS.min_available_nodes,
        query_timeout: float = DEFAULTS.query_timeout,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        evaluate_fn: EvaluateFn | None = None,
        **engine_settings: Any,
    ) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.query_timeout = query_timeout
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.evaluate_fn = evaluate_fn
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
        log_engine_summary(self.engine)
        return empty_parameters()

    def _connected(self) -> Collection[int]:
        if self._client_manager is None:
            return ()
        return {node_id(proxy) for proxy in self._client_manager.all().values()}

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
        proxies = {node_id(proxy): proxy for proxy in client_manager.all().values()}
        self._learn_keys(proxies)
        return [proxies[chosen] for chosen in self.engine.members.sample(proxies, size)]

    def _learn_keys(self, proxies: Mapping[int, ClientProxy]) -> None:
        """Ask the clients whose key the server does not know for it
        (``get_properties``; :meth:`FedGKTNumPyClient.get_properties` answers), so
        that clients are sampled by key and a resumed run's first round sends every
        client its server logits. A client that cannot answer is not asked again."""
        for asked in self.engine.members.keys_to_ask(proxies):
            ins = GetPropertiesIns(config={QUERY_KEY: NODE_KEY})
            try:
                res = proxies[asked].get_properties(ins, timeout=self.query_timeout, group_id=0)
            except Exception as err:  # a client that cannot answer: sampled by node id
                log(INFO, "node %d did not say its key: %s", asked, err)
                self.engine.members.no_key([asked])
                continue
            if res.status.code != Code.OK or NODE_KEY not in res.properties:
                self.engine.members.no_key([asked])
                continue
            self.engine.members.learn_key(asked, res.properties[NODE_KEY])

    def _round_config(self, server_round: int, config_fn: ConfigFn | None) -> dict[str, Scalar]:
        """The round's config: ``config_fn``'s entries (``on_fit_config_fn`` /
        ``on_evaluate_config_fn``) and FedGKT's own, which win a clash."""
        own: dict[str, Scalar] = self.engine.round_config(server_round)
        extra = dict(config_fn(server_round)) if config_fn is not None else {}
        return {**extra, **own}

    # -- training ------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One ``FitIns`` per sampled client, each with that client's server logits."""
        round_log = self.engine.begin_round(server_round)
        clients = self._sample(client_manager, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_fit: sampled %d nodes", len(clients))
        config = self._round_config(server_round, self.on_fit_config_fn)
        instructions = []
        for proxy in clients:
            _, logits = self.engine.instructions(node_id(proxy), training=True)
            fit_parameters = empty_parameters()
            if logits is not None:
                ids, values = logits
                fit_parameters = ndarrays_to_parameters(
                    [ids.astype(np.int64), values.astype(np.float32)]
                )
            round_log.bytes_down += parameters_bytes(fit_parameters)
            fit_ins = FitIns(parameters=fit_parameters, config=dict(config))
            instructions.append((proxy, fit_ins))
        return instructions

    def _record_failures(
        self, server_round: int, failures: Sequence[tuple[ClientProxy, Any] | BaseException]
    ) -> None:
        for failure in failures:
            if isinstance(failure, BaseException):
                reason = f"{type(failure).__name__}: {failure}"
                self.engine.record_failure(server_round, None, reason)
            else:
                proxy, res = failure
                self.engine.record_failure(server_round, node_id(proxy), res.status.message)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate and store the features, train the server model, refresh logits."""
        self._record_failures(server_round, failures)
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
        config = self._round_config(server_round, self.on_evaluate_config_fn)
        return [
            (proxy, EvaluateIns(parameters=empty_parameters(), config=dict(config)))
            for proxy in clients
        ]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Score the server model on the test features; report edge accuracy too."""
        self._record_failures(server_round, failures)
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
        """``evaluate_fn`` on the server model's arrays (None without one). The
        server model is also scored on the clients' test features in
        ``aggregate_evaluate``."""
        if self.evaluate_fn is None:
            return None
        arrays = [t.detach().cpu().numpy() for t in self.trainer.scored_model.state_dict().values()]
        return self.evaluate_fn(server_round, arrays, {})
