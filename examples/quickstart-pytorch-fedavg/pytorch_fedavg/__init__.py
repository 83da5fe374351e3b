"""pytorch_fedavg: Flower's PyTorch quickstart (FedAvg), twin of quickstart-pytorch-fedgkt."""
