"""FedAvg baseline for flwr-fedgkt: the full ResNet-56 / ResNet-110 trained on the
nodes with Flower's own FedAvg, on the same data, partitions, splits, seeds, rounds
and local epochs as a FedGKT run, with the same ``results.json``."""
