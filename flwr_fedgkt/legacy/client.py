"""The FedGKT edge as a legacy ``NumPyClient``: :class:`FedGKTNumPyClient`."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar, ndarray_to_bytes
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..client import ContextStateStore
from ..data import SampleSet
from ..edge import LogitTable, evaluate_metrics, train_metrics
from ..edge_data import EdgeData
from ..edge_state import edge_state_store
from ..node import EdgeNode, EdgeSettings, RoundInstructions, partition_node
from ..privacy import Defences
from ..settings import RunConfig
from ..validation import NODE_KEY
from .wire import EVALUATE_ARRAY_PREFIX, EVALUATE_ARRAYS, FIT_ARRAYS, array_names

__all__ = ["FedGKTNumPyClient", "LegacyData", "as_edge_data", "samples_from_loader"]

LegacyData = EdgeData | DataLoader[Any] | Iterable[Sequence[Any]]
"""A split as :class:`FedGKTNumPyClient` takes it: anything
:class:`~flwr_fedgkt.client.FedGKTClient` takes (a ``SampleSet``, a ``Dataset`` or
sequence of ``(x, y)`` / ``(x, y, sample_id)`` items), or a loader of
``(inputs, labels, sample_ids)`` batches."""


def samples_from_loader(loader: Iterable[Sequence[Tensor]]) -> SampleSet:
    """Collect batches of ``(inputs, labels, sample_ids)`` into a :class:`SampleSet`.

    For a deployment whose data comes as a ``torch.utils.data.DataLoader``: its
    dataset must yield each sample's stable integer id (unique across all nodes) as
    the third item. The loader is read once, in its order; FedGKT shuffles by itself
    (seeded), so pass a loader without shuffling for reproducible runs.
    """
    images, labels, ids = [], [], []
    for batch in loader:
        if len(batch) != 3:
            raise ValueError(
                f"expected batches of (inputs, labels, sample_ids), got {len(batch)} items"
            )
        images.append(torch.as_tensor(batch[0], dtype=torch.float32))
        labels.append(torch.as_tensor(batch[1], dtype=torch.long))
        ids.append(torch.as_tensor(batch[2], dtype=torch.long))
    if not images:
        raise ValueError("the loader yielded no batches")
    return SampleSet(torch.cat(images), torch.cat(labels), torch.cat(ids))


def _is_batch(item: Any) -> bool:
    """Whether a sequence's first item is a batch (its labels a vector), not one
    ``(x, y)`` / ``(x, y, id)`` sample (its label a scalar)."""
    if not isinstance(item, tuple | list) or len(item) < 2:
        return False
    labels = item[1]
    ndim = getattr(labels, "ndim", None)
    return (ndim if ndim is not None else np.ndim(labels)) >= 1


def as_edge_data(data: LegacyData) -> EdgeData:
    """A split as the edge trains on it: a ``SampleSet`` or ``Dataset`` as it is, a
    sequence of samples or a data set of dict items (a flwr-datasets partition) as
    it is, and a loader (or sequence) of batches collected with
    :func:`samples_from_loader`."""
    if isinstance(data, SampleSet | Dataset):
        return data
    indexable = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    if indexable and len(data) > 0:  # type: ignore[arg-type]
        first = data[0]  # type: ignore[index]
        if isinstance(first, Mapping) or (isinstance(data, Sequence) and not _is_batch(first)):
            return data  # type: ignore[return-value]
    return samples_from_loader(data)


EdgeModelSource = nn.Module | Callable[[], nn.Module]
"""The user's edge model: the module itself (its weights are the node's start), or
what builds it (e.g. its class)."""


def _seeded(factory: Callable[[], nn.Module], seed: int) -> Callable[[], nn.Module]:
    """``factory`` with its initialisation drawn from ``seed``, leaving torch's
    global RNG as it was."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()

    return build


class FedGKTNumPyClient(NumPyClient):
    """The FedGKT edge as a legacy ``NumPyClient``.

    ``fit`` runs one edge round exactly as the Message-API ClientApp does (restore
    the edge model and optimizer from ``context.state``, train with CE + KD against
    the server logits that came with the instructions, extract over the training
    split, save the state) and returns the features, logits, labels and sample ids
    (see :mod:`flwr_fedgkt.legacy.wire` for their order). ``evaluate`` returns the
    test split's features and labels, and the edge model's own test loss and
    accuracy. Edge weights never leave the node. Training settings
    (``client-epochs``, ``batch-size``, ``client-lr``, ``temperature``, ``alpha``,
    ``seed``, ``device``) come from the run config, the ones in the server's
    ``config`` overriding it; the feature dtype and round from the server.

    Parameters
    ----------
    context : Context
        The ``Context`` that ``client_fn`` receives: its ``state`` keeps the edge
        model between rounds, its ``run_config`` holds the run's settings.
    train : LegacyData
        The node's training split: a :class:`~flwr_fedgkt.data.SampleSet`, a
        ``torch.utils.data.Dataset`` or sequence of ``(x, y)`` items (the index is
        the sample id) or ``(x, y, sample_id)`` items, or a loader of
        ``(inputs, labels, sample_ids)`` batches (see :func:`samples_from_loader`).
        Inputs are whatever the edge model takes.
    test : LegacyData
        The node's test split, in any of the same forms.
    num_classes : int | None (default: None)
        Number of classes of the task; needed for the built-in edge model only.
    partition_id : int | None (default: None)
        This node's index in the federation (the node config's ``partition-id``
        when None); it seeds the edge model's initialisation and its shuffling, so
        that nodes differ and runs repeat.
    node_key : str | None (default: None)
        The stable key the server keeps this node's state under; the partition id
        (as a string) when None.
    edge_model : nn.Module | Callable[[], nn.Module] | None (default: None)
        The node's own edge model, whose ``forward(x)`` returns ``(logits,
        features)``: a module (a copy of it is the node's start) or what builds one
        (called with torch's RNG seeded as the built-in model's is). The built-in
        ResNet-8 (``3 x 32 x 32`` inputs, ``16 x 32 x 32`` features) when None.
    """

    # pylint: disable=too-many-arguments,too-many-positional-arguments
    def __init__(
        self,
        context: Context,
        train: LegacyData,
        test: LegacyData,
        num_classes: int | None = None,
        partition_id: int | None = None,
        node_key: str | None = None,
        *,
        edge_model: EdgeModelSource | None = None,
    ) -> None:
        if edge_model is None and num_classes is None:
            raise ValueError("give num_classes for the built-in edge model, or your edge_model")
        if partition_id is None:
            if "partition-id" not in context.node_config:
                raise ValueError(
                    "give partition_id, or start the SuperNode with "
                    '--node-config "partition-id=<i>"'
                )
            partition_id = int(context.node_config["partition-id"])
        self.context = context
        self.node_key = str(partition_id) if node_key is None else node_key
        self.config = RunConfig.from_mapping(context.run_config)
        self.train_set = as_edge_data(train)
        self.test_set = as_edge_data(test)
        self.num_classes = num_classes
        self.partition_id = partition_id
        self.edge_model = edge_model

    def _model_factory(self) -> Callable[[], nn.Module] | None:
        """What builds the user's edge model each round (None: the built-in one),
        seeded as :func:`~flwr_fedgkt.node.edge_model_factory` seeds the built-in
        one."""
        model = self.edge_model
        if model is None:
            return None
        if isinstance(model, nn.Module):
            return lambda: copy.deepcopy(model)
        shared = self.config.shared_extractor_init
        return _seeded(model, self.config.seed + (0 if shared else self.partition_id))

    def _node(self, round_config: Mapping[str, Scalar]) -> EdgeNode:
        """The node's round, its edge state in ``context.state`` (and
        ``client-state-dir``): the built-in app's node, with the user's edge model
        when given; its defences the run config's, raised to what the round asks."""
        store = ContextStateStore(self.context)
        factory = self._model_factory()
        defences = self.config.defences.at_least(Defences.from_meta(round_config))
        if factory is None:
            assert self.num_classes is not None  # checked in __init__
            return partition_node(self.config, self.partition_id, self.num_classes, store, defences)
        config = self.config
        return EdgeNode(
            factory,
            edge_state_store(store, config.client_state_dir, str(self.partition_id)),
            EdgeSettings.from_run_config(config),
            seed=config.seed,
            stream=self.partition_id,
            device=config.device,
            freeze_extractor=config.freeze_extractor,
            precision=config.precision,
            defences=defences,
        )

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """This node's key (``node-key``), which the server asks for before the
        node's first round."""
        return {NODE_KEY: self.node_key}

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train the edge model one round; return features, logits, labels and ids.

        Parameters
        ----------
        parameters : NDArrays
            ``[ids, logits]``: this node's server logits by sample id, or ``[]``
            before its first round.
        config : dict[str, Scalar]
            ``server-round``, ``feature-dtype`` and ``freeze-extractor`` (the legacy
            client always sends its features whole and uncompressed), and any of
            ``client-epochs``, ``client-lr``, ``batch-size``, ``temperature``,
            ``alpha`` for this round.

        Returns
        -------
        tuple[NDArrays, int, dict[str, Scalar]]
            The arrays of :data:`~flwr_fedgkt.legacy.FIT_ARRAYS` (plus
            :data:`~flwr_fedgkt.legacy.INT8_ARRAYS` for ``int8``), the number of
            training samples, and ``server-round``, ``feature-dtype``,
            ``train-loss``, ``train-accuracy``.
        """
        ins = RoundInstructions.from_config(config, self.config.feature_dtype)
        server_round, dtype = ins.server_round, ins.dtype
        if len(parameters) not in (0, 2):
            raise ValueError(
                f"expected [] or [ids, logits] as parameters, got {len(parameters)} arrays"
            )
        teacher = LogitTable(parameters[0], parameters[1]) if parameters else None
        node = self._node(config)
        extracted, metrics = node.train(
            self.train_set, server_round, teacher, node.settings.for_round(config), ins.frozen
        )
        arrays = extracted.arrays(dtype, with_logits=True)  # always whole, uncompressed
        reply: dict[str, Scalar] = {
            "server-round": server_round,
            "feature-dtype": dtype,
            NODE_KEY: self.node_key,
            **node.defences.meta(),
        }
        reply.update(train_metrics(metrics))
        return (
            [arrays[name] for name in array_names(FIT_ARRAYS, dtype)],
            len(extracted.ids),
            reply,
        )

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Send the test split's features and labels; score the edge model locally.

        Returns
        -------
        tuple[float, int, dict[str, Scalar]]
            The edge model's test loss, the number of test samples, and
            ``server-round``, ``feature-dtype``, ``edge-accuracy``, ``edge-loss`` and
            the arrays as ``.npy`` bytes under ``array.<name>``.
        """
        ins = RoundInstructions.from_config(config, self.config.feature_dtype)
        server_round, dtype = ins.server_round, ins.dtype
        node = self._node(config)
        extracted, scores = node.evaluate(self.test_set, server_round)
        arrays = extracted.arrays(dtype, with_logits=False)
        reply: dict[str, Scalar] = {
            "server-round": server_round,
            "feature-dtype": dtype,
            NODE_KEY: self.node_key,
            **node.defences.meta(),
            **evaluate_metrics(scores),
        }
        for name in array_names(EVALUATE_ARRAYS, dtype):
            reply[EVALUATE_ARRAY_PREFIX + name] = ndarray_to_bytes(arrays[name])
        return float(scores["loss"]), len(extracted.ids), reply
