"""The legacy ServerApp: ``server_fn`` returns ``LegacyFedGKT`` in place of ``FedAvg``.

:func:`flwr_fedgkt.legacy.server_app.server_fn` builds the strategy from the run config
(server model, optimizer, feature dtype, sampling) with a writer of
``results.json``, and a ``ServerConfig`` of ``num-server-rounds`` rounds.
"""

from flwr.server import ServerApp

from flwr_fedgkt.legacy.server_app import server_fn

app = ServerApp(server_fn=server_fn)
