"""FedGKT as a legacy-API Flower App: ``ClientApp(client_fn=...)`` returning a
``NumPyClient`` and ``ServerApp(server_fn=...)`` returning a legacy ``Strategy``."""
