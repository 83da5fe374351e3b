"""CIFAR-style ResNets with Bottleneck blocks, split for FedGKT.

The edge model (ResNet-8) is a stem and one stage of two Bottleneck blocks. Its
*features* are the stem's output (``B x 16 x 32 x 32`` for a 32x32 image); the
server model (ResNet-55 / ResNet-109) is the rest of a ResNet-56 / ResNet-110 and
takes those features as input. The full ResNet-56 / ResNet-110 serve the FedAvg
baseline.

The *compact* pair (``resnet8-compact`` with ``resnet55-compact`` /
``resnet109-compact``; run config ``compact-features``) ends the edge's stem with
a 1x1 bottleneck convolution to :data:`COMPACT_CHANNELS` channels (with BatchNorm
and ReLU), trained with the edge model: its features are ``3 x 32 x 32``, 3 KiB
per sample in int8 (the raw image's size), and both the edge's and the server's
first Bottleneck block take those 3 channels.

This module imports no Flower code.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "FEATURE_CHANNELS",
    "COMPACT_CHANNELS",
    "feature_shape_of",
    "Bottleneck",
    "EdgeResNet",
    "StagedEdge",
    "ServerResNet",
    "FullResNet",
    "MODEL_NAMES",
    "build_model",
    "count_parameters",
    "seeded_model",
    "extractor_and_server",
    "module_digest",
    "EDGE_MODEL",
    "SERVER_MODELS",
    "FULL_MODEL_OF",
    "FULL_MODELS",
    "MAX_EDGE_STAGES",
    "is_server_model",
    "staged_names",
]

FEATURE_CHANNELS = 16
"""Channels of the stem's output, i.e. of the features sent by the edge."""

COMPACT_CHANNELS = 3
"""Channels of the compact edge's features (``compact-features``)."""

STAGE_WIDTHS = (16, 32, 64)


class Bottleneck(nn.Module):
    """ResNet Bottleneck block (1x1 -> 3x3 -> 1x1, expansion 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _stem(channels: int = FEATURE_CHANNELS) -> nn.Sequential:
    """3x3 conv to 16 channels, BatchNorm, ReLU; for fewer ``channels``, then a 1x1
    bottleneck conv to them, BatchNorm, ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, FEATURE_CHANNELS, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(FEATURE_CHANNELS),
        nn.ReLU(inplace=True),
    ]
    if channels != FEATURE_CHANNELS:
        layers += [
            nn.Conv2d(FEATURE_CHANNELS, channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _stages(
    blocks: tuple[int, ...], in_planes: int = FEATURE_CHANNELS, first: int = 0
) -> tuple[nn.Sequential, int]:
    """Bottleneck stages ``first``, ``first + 1``, ... of a CIFAR ResNet on
    ``in_planes``-channel input; returns the stages and their output width."""
    stages = []
    for index, (planes, count) in enumerate(zip(STAGE_WIDTHS[first:], blocks, strict=False)):
        stride = 1 if index + first == 0 else 2
        layers = []
        for block in range(count):
            layers.append(Bottleneck(in_planes, planes, stride if block == 0 else 1))
            in_planes = planes * Bottleneck.expansion
        stages.append(nn.Sequential(*layers))
    return nn.Sequential(*stages), in_planes


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class EdgeResNet(nn.Module):
    """Edge ResNet-8: stem -> one Bottleneck stage -> global pool -> fc.

    ``forward`` returns ``(logits, features)``; ``features`` is the stem's output.
    """

    def __init__(
        self, num_classes: int = 10, blocks: int = 2, feature_channels: int = FEATURE_CHANNELS
    ) -> None:
        super().__init__()
        self.stem = _stem(feature_channels)
        self.body, width = _stages((blocks,), feature_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stem(x)
        out = self.pool(self.body(features)).flatten(1)
        return self.fc(out), features


class StagedEdge(nn.Module):
    """The first stages of a CIFAR ResNet on the edge (``edge-stages``): the stem
    and ``len(blocks)`` Bottleneck stages extract the features, a global pool and
    fc on them give the edge's own logits.

    ``forward`` returns ``(logits, features)``.
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10) -> None:
        super().__init__()
        body, width = _stages(blocks)
        self.extractor = nn.Sequential(_stem(), body)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.extractor(x)
        return self.fc(self.pool(features).flatten(1)), features


class ServerResNet(nn.Module):
    """The large model without its stem: three Bottleneck stages on edge features
    (the stages from ``first`` on, when the edge keeps the earlier ones)."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        num_classes: int = 10,
        feature_channels: int = FEATURE_CHANNELS,
        first: int = 0,
    ) -> None:
        super().__init__()
        self.body, width = _stages(blocks, feature_channels, first)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(features)).flatten(1))


class FullResNet(nn.Module):
    """A whole CIFAR ResNet (stem + three Bottleneck stages), for the FedAvg baseline."""

    def __init__(self, blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _stem()
        self.body, width = _stages(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


_FACTORIES: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": lambda n: EdgeResNet(n),
    "resnet55": lambda n: ServerResNet((6, 6, 6), n),
    "resnet109": lambda n: ServerResNet((12, 12, 12), n),
    "resnet8-compact": lambda n: EdgeResNet(n, feature_channels=COMPACT_CHANNELS),
    "resnet55-compact": lambda n: ServerResNet((6, 6, 6), n, COMPACT_CHANNELS),
    "resnet109-compact": lambda n: ServerResNet((12, 12, 12), n, COMPACT_CHANNELS),
    "resnet56": lambda n: FullResNet((6, 6, 6), n),
    "resnet110": lambda n: FullResNet((12, 12, 12), n),
}

STAGED = {"resnet55": ("resnet56", 6), "resnet109": ("resnet110", 12)}
"""Server models whose network the edge may keep the first stages of: the whole
model's name and its blocks per stage."""
MAX_EDGE_STAGES = 2


def staged_names(server: str, stages: int) -> tuple[str, str]:
    """The edge and server models when the edge keeps the first ``stages`` stages
    of the network that ``server`` completes: ``resnet56-edge1`` and
    ``resnet56-server1`` for ``resnet55`` and one stage."""
    whole = STAGED[server][0]
    return f"{whole}-edge{stages}", f"{whole}-server{stages}"


def _stage_width(stages: int) -> int:
    return STAGE_WIDTHS[stages - 1] * Bottleneck.expansion


def _staged_factories(blocks: int, stages: int) -> tuple[Callable[[int], nn.Module], ...]:
    """The edge and server factories of a network of ``blocks`` per stage whose
    first ``stages`` stay on the edge."""

    def edge(n: int) -> nn.Module:
        return StagedEdge((blocks,) * stages, n)

    def server(n: int) -> nn.Module:
        return ServerResNet((blocks,) * (3 - stages), n, _stage_width(stages), first=stages)

    return edge, server


for _server, (_whole, _blocks) in STAGED.items():
    for _stages_kept in range(1, MAX_EDGE_STAGES + 1):
        _names = staged_names(_server, _stages_kept)
        _FACTORIES.update(zip(_names, _staged_factories(_blocks, _stages_kept), strict=True))

MODEL_NAMES = tuple(_FACTORIES)
EDGE_MODEL = "resnet8"
SERVER_MODELS = ("resnet55", "resnet109")
"""Server models: the rest of a ResNet-56 / ResNet-110 after the edge's stem."""


_STAGED_SERVERS = frozenset(
    staged_names(server, stages)[1] for server in STAGED for stages in range(1, MAX_EDGE_STAGES + 1)
)
"""The server models that follow ``edge-stages`` stages on the edge."""


def is_server_model(name: str) -> bool:
    """Whether ``name`` is a built-in server model (it takes features): one of
    :data:`SERVER_MODELS`, its compact variant, or the rest of its network after
    ``edge-stages``."""
    return name.removesuffix(COMPACT) in SERVER_MODELS or name in _STAGED_SERVERS


COMPACT = "-compact"
"""The suffix of the compact models' names."""
FULL_MODEL_OF = {"resnet55": "resnet56", "resnet109": "resnet110"}
"""The whole model (for FedAvg) that each server model completes."""
FULL_MODELS = tuple(FULL_MODEL_OF.values())


def feature_shape_of(name: str) -> tuple[int, int, int]:
    """The per-sample features a built-in edge model sends or a built-in server
    model takes: ``16 x 32 x 32``, ``3 x 32 x 32`` for the compact models, and
    after ``s`` stages on the edge (``...-edge<s>`` / ``...-server<s>``) the
    stage's output: ``64 x 32 x 32`` after one, ``128 x 16 x 16`` after two."""
    for stages in range(1, MAX_EDGE_STAGES + 1):
        if name.endswith((f"-edge{stages}", f"-server{stages}")):
            side = 32 // 2 ** (stages - 1)
            return (_stage_width(stages), side, side)
    channels = COMPACT_CHANNELS if name.endswith(COMPACT) else FEATURE_CHANNELS
    return (channels, 32, 32)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a model by name: ``resnet8`` (edge), ``resnet55`` / ``resnet109``
    (server), ``resnet56`` / ``resnet110`` (full, for FedAvg), and the compact
    pair ``resnet8-compact``, ``resnet55-compact`` / ``resnet109-compact``."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}"
        ) from None
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return factory(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seeded_model(name: str, num_classes: int = 10, seed: int | None = None) -> nn.Module:
    """:func:`build_model` with its initialisation drawn from ``seed`` (when given),
    leaving torch's global RNG as it was."""
    if seed is None:
        return build_model(name, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, num_classes)


def extractor_and_server(extractor: nn.Module, server: nn.Module) -> nn.Sequential:
    """One model for inference: the edge's feature extractor, then the server
    model (state-dict keys ``extractor.*`` and ``server.*``)."""
    return nn.Sequential(OrderedDict(extractor=extractor, server=server))


def module_digest(module: nn.Module) -> str:
    """A digest of a module's state (its parameters and buffers, in key order):
    equal for modules built alike from one seed, in any process."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        raw = value.detach().cpu().contiguous().flatten().view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()
