"""FedGKT (Group Knowledge Transfer) for Flower.

The core (models, distill, edge, server, features, data, accounting, config,
results) is plain PyTorch; the Flower layer (strategy, client_app, server_app,
records) is thin and imports the core, never the reverse.
"""

__version__ = "0.1.0"
