"""Build a FedGKT edge/server model pair by cutting an existing model.

:func:`cut_model` traces a model with :mod:`torch.fx` and cuts its graph at the
output of a named submodule: everything up to and including that module becomes the
edge's feature extractor, everything after it (including functional ops such as
``torch.flatten``) becomes the server model. A small classifier head on the
extractor's output gives the edge its own logits.

The pieces hold the original model's submodules, not copies: training the pair
trains ``model`` too. Pass ``copy.deepcopy(model)`` to keep the original apart.

This module imports no Flower code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from .accounting import count_flops
from .models import count_parameters

__all__ = ["ModelPair", "EdgeModel", "cut_model"]

_BATCH = 2


class _GlobalAvgPool(nn.Module):
    """Mean over every dimension after the channel dimension: ``N x C x ... -> N x C``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(2, x.dim())))


class EdgeModel(nn.Module):
    """Feature extractor and classifier head of an edge device.

    Parameters
    ----------
    extractor : nn.Module
        Maps an input batch to features.
    head : nn.Module
        Maps features to logits.
    """

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(logits, features)`` for an input batch ``x``."""
        features = self.extractor(x)
        return self.head(features), features


@dataclass(frozen=True)
class ModelPair:
    """An edge model and the server model that continues from its features.

    Attributes
    ----------
    edge : EdgeModel
        ``forward(x) -> (logits, features)``.
    server : nn.Module
        ``forward(features) -> logits``.
    feature_shape : tuple[int, ...]
        Per-sample shape of the features (no batch dimension).
    num_classes : int
        Width of the logits.
    input_shape : tuple[int, ...]
        Per-sample input shape used for tracing and counting.
    """

    edge: EdgeModel
    server: nn.Module
    feature_shape: tuple[int, ...]
    num_classes: int
    input_shape: tuple[int, ...]

    def profile(self) -> dict[str, dict[str, Any]]:
        """Parameters and FLOPs per sample of the edge and the server model.

        Returns
        -------
        dict[str, dict[str, Any]]
            ``{"edge": {...}, "server": {...}}``, each with ``"params"``,
            ``"forward_flops_per_sample"``, ``"train_flops_per_sample"`` and
            ``"feature_shape"``. Counted on copies, so the models' weights, buffers,
            gradients and training modes and the global RNG are left as they were.
        """
        parts = {"edge": (self.edge, self.input_shape), "server": (self.server, self.feature_shape)}
        result: dict[str, dict[str, Any]] = {}
        for name, (module, shape) in parts.items():
            forward, train = 0.0, 0.0  # a module without parameters counts no FLOPs
            if any(p.requires_grad for p in module.parameters()):
                with torch.random.fork_rng(devices=[]):
                    forward, train = count_flops(copy.deepcopy(module), shape, batch=_BATCH)
            result[name] = {
                "params": count_parameters(module),
                "forward_flops_per_sample": forward,
                "train_flops_per_sample": train,
                "feature_shape": self.feature_shape,
            }
        return result


def _cut_node(graph: fx.Graph, at: str) -> fx.Node | None:
    """The last node computed inside the submodule ``at``, or ``None``."""
    last = None
    for node in graph.nodes:
        target = node.target if node.op == "call_module" else ""
        stack = node.meta.get("nn_module_stack") or {}
        if (
            target == at
            or str(target).startswith(at + ".")
            or any(path == at for path, _ in stack.values())
        ):
            last = node
    return last


def _split(traced: fx.GraphModule, cut: fx.Node, at: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The extractor (nodes up to ``cut``) and server (nodes after it) of ``traced``."""
    nodes = list(traced.graph.nodes)
    index = nodes.index(cut)
    before, after = nodes[: index + 1], nodes[index + 1 :]

    front = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in before:
        env[node] = front.node_copy(node, lambda n: env[n])
    front.output(env[cut])

    back = fx.Graph()
    env = {cut: back.placeholder("features")}
    earlier = set(before)

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env and n in earlier:
            if n.op != "get_attr":  # parameters and buffers may be read on both sides
                raise ValueError(
                    f"cannot cut at {at!r}: the model has no single-tensor boundary there "
                    f"({n.name!r}, computed before the cut, is used after it)"
                )
            env[n] = back.node_copy(n)
        return env[n]

    for node in after:
        env[node] = back.node_copy(node, lookup)
    pieces = fx.GraphModule(traced, front), fx.GraphModule(traced, back)
    for piece in pieces:  # drop side computations that do not reach the piece's output
        piece.graph.eliminate_dead_code()
        piece.delete_all_unused_submodules()
        piece.recompile()
    return pieces


def _default_head(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    linear = nn.Linear(feature_shape[0], num_classes)
    return linear if len(feature_shape) == 1 else nn.Sequential(_GlobalAvgPool(), linear)


def cut_model(
    model: nn.Module,
    at: str,
    input_shape: tuple[int, ...],
    *,
    head: nn.Module | None = None,
    num_classes: int | None = None,
) -> ModelPair:
    """Cut ``model`` after its submodule ``at`` into an edge/server pair.

    Parameters
    ----------
    model : nn.Module
        A model that :func:`torch.fx.symbolic_trace` can trace, mapping an input batch
        to logits ``N x num_classes``. Its submodules are shared with the pair. As
        always with tracing, Python control flow (including on ``self.training``)
        is fixed at trace time.
    at : str
        Qualified name of the submodule (e.g. ``"layer1"``) whose output is the
        features. A container traced through counts by the last node inside it; a
        module called several times is cut after its last call.
    input_shape : tuple[int, ...]
        Per-sample input shape, e.g. ``(3, 32, 32)``.
    head : nn.Module or None
        The edge's classifier on the features. By default, a global average pool over
        every dimension after the channels followed by ``nn.Linear(channels,
        num_classes)`` (just the linear layer for ``N x C`` features), on the model's
        device and dtype, initialised from the global RNG (seed it for a
        reproducible head).
    num_classes : int or None
        Width of the logits; by default the width of ``model``'s output, which it
        must equal when given (edge and server logits are distilled into each other).

    Returns
    -------
    ModelPair
        For the same weights and in eval mode, ``pair.server(pair.edge.extractor(x))``
        equals ``model(x)``.

    Raises
    ------
    ValueError
        If ``at`` names no submodule called by ``model``, if ``model`` cannot be
        traced, if a value other than the cut module's output crosses the cut, or if
        the outputs do not have the expected shapes.
    """
    modules = dict(model.named_modules())
    if not at or at not in modules:
        children = [name for name, _ in model.named_children()]
        raise ValueError(f"model has no submodule {at!r}; its children are {children}")
    try:
        traced = fx.symbolic_trace(model)
    except Exception as err:
        raise ValueError(f"torch.fx cannot trace {type(model).__name__}: {err}") from err
    cut = _cut_node(traced.graph, at)
    if cut is None:
        raise ValueError(f"submodule {at!r} is not called in the model's forward")
    extractor, server = _split(traced, cut, at)

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            x = torch.randn(_BATCH, *input_shape, device=device, dtype=dtype)
            features = extractor(x)
            logits = server(features)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(features, Tensor) or not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"{at!r} must output a tensor and the model logits of shape N x classes")
    feature_shape = tuple(features.shape[1:])
    if num_classes is not None and num_classes != logits.shape[1]:
        raise ValueError(f"num_classes is {num_classes} but the model outputs {logits.shape[1]}")
    num_classes = logits.shape[1]
    if head is None:
        head = _default_head(feature_shape, num_classes).to(device=device, dtype=dtype)
    was_training = head.training
    with torch.no_grad():
        edge_logits = head.eval()(features)
    head.train(was_training)
    if tuple(edge_logits.shape) != (_BATCH, num_classes):
        raise ValueError(
            f"the head maps features {feature_shape} to {tuple(edge_logits.shape[1:])}, "
            f"not ({num_classes},)"
        )
    return ModelPair(EdgeModel(extractor, head), server, feature_shape, num_classes, input_shape)
