"""A test app: FedGKT on Flower's legacy API (``client_fn`` returning
``FedGKTNumPyClient``, ``server_fn`` returning ``LegacyFedGKT``) with the app's own
edge model, server model and data (the 8x8 digits of scikit-learn as flwr-datasets
dict items)."""
