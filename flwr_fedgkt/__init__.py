"""FedGKT (Group Knowledge Transfer) for Flower.

The public API, importable from ``flwr_fedgkt``:

- :class:`FedGKT`: the strategy on Flower's Message API (``strategy.start(...)``),
  and :class:`FedGKTClient`, the ``train``/``evaluate`` handlers of a ClientApp
  with the node's own edge model and data; :class:`LegacyFedGKT` and
  :class:`FedGKTNumPyClient` on the legacy API;
- :class:`EdgeNode` (with :class:`EdgeSettings`): a node's rounds without Flower;
- :class:`RoundEngine`: the server's round without Flower, which both hold;
- :class:`ServerTrainer` and :class:`EdgeTrainer`: the two sides' training;
- :func:`cut_model`: an edge/server pair cut from any model at a named child
  (:class:`ModelPair`, :class:`EdgeModel`);
- the paper's models (:func:`build_model`, :data:`SERVER_MODELS`), the KD loss
  (:func:`ce_kd_loss`), the wire codec (:func:`encode_features`,
  :func:`decode_features`, :data:`FEATURE_DTYPES`) and the typed run config
  (:class:`RunConfig`), and :class:`ResultsWriter` (``results.json`` and
  ``accuracy.png``, as the built-in ServerApp writes them, e.g. from
  ``on_round_end``).

The core (models, distill, edge, server, features, rounds, data, accounting,
config, results) is plain PyTorch; the Flower layer (strategy, compat, records,
client_app, server_app) is thin and imports the core, never the reverse. Names are
imported on first use, so ``import flwr_fedgkt.models`` loads no Flower code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FedGKT": "strategy",
    "LegacyFedGKT": "compat",
    "FedGKTNumPyClient": "compat",
    "FedGKTClient": "client",
    "EdgeNode": "node",
    "EdgeSettings": "node",
    "RoundEngine": "rounds",
    "RoundLog": "rounds",
    "ServerTrainer": "server",
    "EdgeTrainer": "edge",
    "LogitTable": "edge",
    "build_model": "models",
    "cut_model": "cut",
    "ModelPair": "cut",
    "EdgeModel": "cut",
    "SERVER_MODELS": "models",
    "EdgeResNet": "models",
    "ServerResNet": "models",
    "FullResNet": "models",
    "ce_kd_loss": "distill",
    "kd_loss": "distill",
    "encode_features": "features",
    "decode_features": "features",
    "FEATURE_DTYPES": "features",
    "FeatureStore": "features",
    "PayloadError": "features",
    "RunConfig": "config",
    "ResultsWriter": "results",
    "SampleSet": "data",
}

__all__ = [
    "EdgeModel",
    "EdgeNode",
    "EdgeResNet",
    "EdgeSettings",
    "EdgeTrainer",
    "FEATURE_DTYPES",
    "FeatureStore",
    "FedGKT",
    "FedGKTClient",
    "FedGKTNumPyClient",
    "FullResNet",
    "LegacyFedGKT",
    "LogitTable",
    "ModelPair",
    "PayloadError",
    "RoundEngine",
    "ResultsWriter",
    "RoundLog",
    "RunConfig",
    "SERVER_MODELS",
    "SampleSet",
    "ServerResNet",
    "ServerTrainer",
    "build_model",
    "ce_kd_loss",
    "cut_model",
    "decode_features",
    "encode_features",
    "kd_loss",
]

if TYPE_CHECKING:
    from .client import FedGKTClient
    from .compat import FedGKTNumPyClient, LegacyFedGKT
    from .config import RunConfig
    from .cut import EdgeModel, ModelPair, cut_model
    from .data import SampleSet
    from .distill import ce_kd_loss, kd_loss
    from .edge import EdgeTrainer, LogitTable
    from .features import (
        FEATURE_DTYPES,
        FeatureStore,
        PayloadError,
        decode_features,
        encode_features,
    )
    from .models import SERVER_MODELS, EdgeResNet, FullResNet, ServerResNet, build_model
    from .node import EdgeNode, EdgeSettings
    from .results import ResultsWriter
    from .rounds import RoundEngine, RoundLog
    from .server import ServerTrainer
    from .strategy import FedGKT


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flwr_fedgkt' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
