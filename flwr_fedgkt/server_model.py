"""The server's model: a built-in one by name or one of your own, the number of
classes it gives, and its input features moved onto its device.

:class:`~flwr_fedgkt.server.ServerTrainer` trains and scores the model this
module picks (:func:`server_model`).

This module imports no Flower code.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from .models import (
    COMPACT,
    SERVER_MODELS,
    extractor_and_server,
    feature_shape_of,
    is_server_model,
    module_digest,
    seeded_model,
)

if TYPE_CHECKING:
    from .server import ServerTrainer

__all__ = [
    "ServerModel",
    "load_server_state",
    "output_classes",
    "server_model",
    "takes_channels_last",
    "to_device",
]


class ServerModel(NamedTuple):
    """The server model and what the trainer knows of it."""

    module: nn.Module
    name: str  # the built-in model's name, or your model's class name
    num_classes: int
    feature_shape: tuple[int, ...] | None  # one sample's features, when known


def server_model(
    num_classes: int | None,
    model_name: str,
    model: nn.Module | None,
    feature_shape: tuple[int, ...] | None,
    seed: int,
) -> ServerModel:
    """The built-in model ``model_name`` (seeded with ``seed``) when ``model`` is
    None, else ``model``; ValueError when the name is not a server model's or the
    class count can be neither given nor read.

    Parameters
    ----------
    num_classes : int | None
        Size of the classification head; for your own ``model`` it is read off
        the model's output on features of ``feature_shape`` when None.
    model_name : str
        A built-in server model (``resnet55``, ``resnet109`` or their compact
        variants).
    model : nn.Module | None
        Your own server model instead.
    feature_shape : tuple[int, ...] | None
        One sample's feature shape (the built-in model's own when None).
    seed : int
        Seeds the built-in model's initialisation.
    """
    if model is None:
        if not is_server_model(model_name):
            raise ValueError(
                f"server model must be one of {', '.join(SERVER_MODELS)} (or their "
                f"{COMPACT} variants, or the rest of one after edge-stages), got {model_name!r}"
            )
        if num_classes is None:
            raise ValueError("num_classes is required for a built-in server model")
        model = seeded_model(model_name, num_classes, seed)
        feature_shape = feature_shape or feature_shape_of(model_name)
    else:
        model_name = type(model).__name__
        if num_classes is None:
            if feature_shape is None:
                raise ValueError("give num_classes or feature_shape for your own server model")
            num_classes = output_classes(model, feature_shape)
    shape = None if feature_shape is None else tuple(feature_shape)
    return ServerModel(model, model_name, num_classes, shape)


@torch.no_grad()
def output_classes(model: nn.Module, feature_shape: tuple[int, ...]) -> int:
    """How many logits ``model`` gives for one sample of features ``feature_shape``
    (a forward pass on zeros in eval mode; the model's mode is restored)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        out = model(torch.zeros(2, *feature_shape, device=device))
    except Exception as err:
        raise ValueError(
            f"the server model does not take features of shape {tuple(feature_shape)}: {err}"
        ) from err
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the server model must map a batch of features to logits, gave {shape}")
    return int(out.shape[1])


def to_device(features: Tensor, device: torch.device, channels_last: bool = True) -> Tensor:
    """Features on ``device``; image-like (4-D) ones channels-last when
    ``channels_last``. For a GPU the batch is copied from pinned (page-locked)
    memory without blocking, so the copy overlaps the GPU's work; on a CPU nothing
    is pinned or copied."""
    layout = torch.channels_last if channels_last and features.dim() == 4 else None
    if device.type == "cuda":
        features = features.pin_memory()
        if layout is not None:
            return features.to(device, non_blocking=True, memory_format=layout)
        return features.to(device, non_blocking=True)
    if layout is not None:
        return features.to(device, memory_format=layout)
    return features.to(device)


@torch.no_grad()
def takes_channels_last(model: nn.Module, feature_shape: tuple[int, ...] | None) -> bool:
    """Whether ``model`` runs on channels-last image features (about 1.5x faster
    convolutions on a CPU): a forward pass on channels-last zeros with the model
    converted, in eval mode. A model that reshapes with ``view`` after a
    convolution (as Flower's quickstart ``Net`` does) cannot; it is converted back."""
    if feature_shape is None or len(feature_shape) != 3:
        return False
    modes = [(module, module.training) for module in model.modules()]  # e.g. a frozen stem
    model.eval().to(memory_format=torch.channels_last)
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        zeros = torch.zeros(2, *feature_shape, device=device)
        # quiet: an fx-traced model (cut_model's) prints the failure it raises
        with contextlib.redirect_stderr(io.StringIO()):
            model(zeros.to(memory_format=torch.channels_last))
        return True
    except RuntimeError:
        model.to(memory_format=torch.contiguous_format)
        return False
    finally:
        for module, training in modes:
            module.training = training


def load_server_state(
    trainer: ServerTrainer, state: dict[str, Tensor], extractor: nn.Module | None = None
) -> None:
    """Load ``state`` into ``trainer``'s server model: a server model's
    ``state_dict``, or with ``extractor`` a deployable model's (extractor, then
    server model: :func:`~flwr_fedgkt.models.extractor_and_server`), whose
    extractor must be ``extractor``. A ValueError names what does not fit."""
    model: nn.Module = trainer.model
    loaded_extractor = None
    if extractor is not None and any(key.startswith("extractor.") for key in state):
        loaded_extractor = copy.deepcopy(extractor)
        model = extractor_and_server(loaded_extractor, trainer.model)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"initial_arrays is not a state_dict of the server model ({trainer.model_name}) "
            f"or of the deployable model: {err}"
        ) from None
    if loaded_extractor is not None and extractor is not None:
        if module_digest(loaded_extractor) != module_digest(extractor):
            raise ValueError("initial_arrays holds another extractor than the strategy's")
