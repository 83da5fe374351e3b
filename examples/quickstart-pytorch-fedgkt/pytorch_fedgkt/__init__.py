"""pytorch_fedgkt: the PyTorch quickstart, trained with FedGKT instead of FedAvg."""
