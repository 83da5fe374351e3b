"""The legacy ServerApp: ``server_fn`` returns ``LegacyFedGKT`` in place of ``FedAvg``.

:func:`flwr_fedgkt.compat.server_fn` builds the strategy from the run config
(server model, optimizer, feature dtype, sampling) with a writer of
``results.json``, and a ``ServerConfig`` of ``num-server-rounds`` rounds.
"""

from flwr.server import ServerApp

from flwr_fedgkt.compat import server_fn

app = ServerApp(server_fn=server_fn)
