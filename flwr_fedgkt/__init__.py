"""FedGKT (Group Knowledge Transfer) for Flower.

The public API, importable from ``flwr_fedgkt``:

- the strategy on Flower's Message API, :class:`FedGKT` (rounds in Flower's own
  loop) and :class:`PipelinedFedGKT` (the server trains round t during round t+1);
- :class:`FedGKTClient`, the ``train``/``evaluate``/``query`` handlers of a
  ClientApp with the node's own edge model and data (:func:`default_node_key`,
  :func:`key_reply` for a query handler of one's own);
- :class:`ServerTrainer` (the server model with its training settings) and
  :class:`FeatureStore` (in memory or memory-mapped on disk);
- :func:`cut_model`: an edge/server pair cut from any model at a named child
  (:class:`ModelPair`, :class:`EdgeModel`); the paper's models
  (:func:`build_model`, :data:`SERVER_MODELS`, :class:`EdgeResNet`,
  :class:`ServerResNet`, :class:`FullResNet`) and the KD loss (:func:`ce_kd_loss`);
- :class:`Settings` (every option with its default and documentation;
  :data:`DEFAULTS`; ``RunConfig`` is the same type), :class:`ResultsWriter`;
- the errors: :class:`ConfigError`, :class:`PayloadError`,
  :class:`NoProgressError`, :class:`DataUnavailableError`, :class:`PartitionError`.

The legacy Flower API (``NumPyClient``, legacy ``Strategy``) is
:mod:`flwr_fedgkt.legacy`. The core (models, distill, edge, server, codec,
validation, store, rounds, data, accounting, settings, results) is plain
PyTorch; the Flower layer (strategy, pipeline, asynchronous, legacy, records, client,
client_app, server_app) is thin and imports the core, never the reverse. Names
are imported on first use, so ``import flwr_fedgkt.models`` loads no Flower code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FedGKT": "strategy",
    "PipelinedFedGKT": "pipeline",
    "AsyncFedGKT": "asynchronous",
    "FedGKTClient": "client",
    "default_node_key": "client",
    "key_reply": "client",
    "ServerTrainer": "server",
    "FeatureStore": "store",
    "cut_model": "cut",
    "ModelPair": "cut",
    "EdgeModel": "cut",
    "build_model": "models",
    "SERVER_MODELS": "models",
    "EdgeResNet": "models",
    "ServerResNet": "models",
    "FullResNet": "models",
    "ce_kd_loss": "distill",
    "Settings": "settings",
    "RunConfig": "settings",
    "DEFAULTS": "settings",
    "ResultsWriter": "results",
    "ConfigError": "settings",
    "PayloadError": "codec",
    "NoProgressError": "recorder",
    "DataUnavailableError": "data",
    "PartitionError": "data",
    "Defences": "privacy",
    "StagedEdge": "models",
}
# importable from here for code written against earlier versions; not the API
_INTERNAL = {
    "EdgeNode": "node",
    "EdgeSettings": "node",
    "RoundEngine": "rounds",
    "RoundLog": "recorder",
    "EdgeTrainer": "edge",
    "LogitTable": "edge",
    "kd_loss": "distill",
    "encode_features": "codec",
    "decode_features": "codec",
    "FEATURE_DTYPES": "codec",
    "SampleSet": "data",
}

__all__ = [
    "AsyncFedGKT",
    "ConfigError",
    "DEFAULTS",
    "DataUnavailableError",
    "Defences",
    "EdgeModel",
    "EdgeResNet",
    "FeatureStore",
    "FedGKT",
    "FedGKTClient",
    "FullResNet",
    "ModelPair",
    "NoProgressError",
    "PartitionError",
    "PayloadError",
    "PipelinedFedGKT",
    "ResultsWriter",
    "RunConfig",
    "SERVER_MODELS",
    "ServerResNet",
    "ServerTrainer",
    "Settings",
    "StagedEdge",
    "build_model",
    "ce_kd_loss",
    "cut_model",
    "default_node_key",
    "key_reply",
]

if TYPE_CHECKING:
    from .asynchronous import AsyncFedGKT
    from .client import FedGKTClient, default_node_key, key_reply
    from .codec import PayloadError
    from .cut import EdgeModel, ModelPair, cut_model
    from .data import DataUnavailableError, PartitionError
    from .distill import ce_kd_loss
    from .models import (
        SERVER_MODELS,
        EdgeResNet,
        FullResNet,
        ServerResNet,
        StagedEdge,
        build_model,
    )
    from .pipeline import PipelinedFedGKT
    from .privacy import Defences
    from .recorder import NoProgressError
    from .results import ResultsWriter
    from .server import ServerTrainer
    from .settings import DEFAULTS, ConfigError, RunConfig, Settings
    from .store import FeatureStore
    from .strategy import FedGKT


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _INTERNAL.get(name)
    if module is None:
        raise AttributeError(f"module 'flwr_fedgkt' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
