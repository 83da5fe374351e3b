"""pytorch_fedgkt: the quickstart's Net cut in two for FedGKT (new in this app).

``cut_model`` cuts Net after ``conv2``. The nodes run conv1, pool and conv2 (the
extractor; its features are 16x10x10 per image) and a small head of their own.
The server runs the rest of Net (relu, pool, fc1, fc2, fc3) on the features.
The server and every node build the pair from the same seed. With a shared frozen
extractor, that makes every node's extractor the same one, and the extractor
followed by the trained server part is a whole Net again: the deployable model.
"""

import copy

import torch.nn as nn

from flwr_fedgkt import ModelPair, cut_model
from flwr_fedgkt.models import extractor_and_server
from pytorch_fedgkt.task import Net, seeded

CUT_AT = "conv2"
INPUT_SHAPE = (3, 32, 32)


def edge_head() -> nn.Module:
    """The edge's own classifier on the 16x10x10 features: Net's next relu and pool,
    then one linear layer (4,010 parameters)."""
    return nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def net_pair(seed: int) -> ModelPair:
    """Net, built from ``seed``, cut after ``conv2``: ``pair.edge`` (extractor and
    head, ``forward(x) -> (logits, features)``), ``pair.server`` (features to
    logits) and ``pair.feature_shape`` (16, 10, 10)."""
    return seeded(lambda: cut_model(Net(), CUT_AT, INPUT_SHAPE, head=edge_head()), seed)


def deployable_model(pair: ModelPair) -> nn.Module:
    """A copy of the pair's extractor followed by a copy of its server part: images
    to logits, with the ``state_dict`` keys (``extractor.*``, ``server.*``) of the
    model that ``FedGKT(..., extractor=...)`` returns."""
    return extractor_and_server(copy.deepcopy(pair.edge.extractor), copy.deepcopy(pair.server))
