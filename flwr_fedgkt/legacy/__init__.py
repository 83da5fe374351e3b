"""FedGKT on Flower's legacy API: a ``NumPyClient`` and a legacy ``Strategy``.

Deployments built on ``ClientApp(client_fn=...)`` with a
:class:`flwr.client.NumPyClient` and ``ServerApp(server_fn=...)`` with a
:class:`flwr.server.strategy.Strategy` adopt FedGKT by returning
:class:`FedGKTNumPyClient` from their ``client_fn`` and :class:`LegacyFedGKT` from
their ``server_fn`` (in place of ``FedAvg``, whose argument names it takes where
they mean the same). Both are faces over the same code as the Message-API apps:
the client runs the built-in node's round (:class:`flwr_fedgkt.node.EdgeNode`, edge
state in ``context.state`` and ``client-state-dir``, as the ClientApp keeps it),
with the built-in ResNet-8 or the node's own edge model; the strategy holds the
same :class:`flwr_fedgkt.rounds.RoundEngine` as
:class:`~flwr_fedgkt.strategy.FedGKT` (reply validation, server training, server
logits, scoring, round records).

Modules: :mod:`~flwr_fedgkt.legacy.client` (the ``NumPyClient``),
:mod:`~flwr_fedgkt.legacy.strategy` (the ``Strategy``),
:mod:`~flwr_fedgkt.legacy.fedavg_names` (``FedAvg``'s argument names),
:mod:`~flwr_fedgkt.legacy.wire` (what travels, and reading the replies) and
:mod:`~flwr_fedgkt.legacy.server_app` (the built-in app's ``server_fn``; import it
from there, since it loads the Message-API ServerApp's module).
"""

from .client import FedGKTNumPyClient, samples_from_loader
from .strategy import LegacyFedGKT
from .wire import EVALUATE_ARRAY_PREFIX, EVALUATE_ARRAYS, FIT_ARRAYS, INT8_ARRAYS

__all__ = [
    "EVALUATE_ARRAYS",
    "EVALUATE_ARRAY_PREFIX",
    "FIT_ARRAYS",
    "INT8_ARRAYS",
    "FedGKTNumPyClient",
    "LegacyFedGKT",
    "samples_from_loader",
]
