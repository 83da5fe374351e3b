"""pytorch_fedgkt: Flower's PyTorch quickstart, trained with FedGKT instead of FedAvg."""
