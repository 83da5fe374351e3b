"""custom_models: FedGKT with a model pair of your own, an MLP on 8x8 digits."""
