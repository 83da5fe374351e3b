"""A ClientApp for tests: FedGKT's own, except that partition 2 replies with
labels out of range and partition 3 raises during training."""
