"""FedGKTClient: the edge side of FedGKT for any Flower ClientApp.

A node brings its own edge model and data; :class:`FedGKTClient` provides the
``train`` and ``evaluate`` handlers of a Message-API ClientApp::

    app = ClientApp()

    def fedgkt_client(context: Context) -> FedGKTClient:
        train_data, test_data = load_data(context.node_config["partition-id"])
        return FedGKTClient(EdgeNet, train_data, test_data, lr=0.001)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return fedgkt_client(context).train(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return fedgkt_client(context).evaluate(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return key_reply(msg, default_node_key(context.node_config), context)

``query`` tells the server the node's key before its first round (no data is
loaded for it), so that the server samples nodes by key and a resumed run sends
every node its server logits from its first round on; an app without it still
works, and its nodes are sampled by node id. Every reply and key answer proves
the key with the node's own signing key (:mod:`flwr_fedgkt.identity`), kept in
``context.state`` (and in ``state_dir``, for a restarted node).

The handlers only translate Messages; the round itself is
:class:`flwr_fedgkt.node.EdgeNode`. The edge model and its optimizer live in
``context.state`` between rounds (:class:`ContextStateStore`) and, with
``state_dir``, also on disk; edge weights never leave the node.

The data may be a flwr-datasets partition as Flower's quickstart loads it (dict
items ``{"img": ..., "label": ...}``); ``transform`` prepares each image::

    fds = FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": 10})
    partition = fds.load_partition(partition_id)
    FedGKTClient(EdgeNet, partition, transform=Compose([ToTensor(), Normalize(...)]))

The client reads the first item of its data and puts it through a fresh edge
model when it is built, so that data or a model that cannot work is a ValueError
on the node before any round, not an error deep inside its first round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from .edge import (
    EdgeData,
    Extracted,
    LogitTable,
    OptimizerFactory,
    evaluate_metrics,
    train_metrics,
)
from .edge_data import ImageTransform, check_edge_data, readable_data
from .node import (
    EdgeNode,
    EdgeSettings,
    RoundInstructions,
    check_feature_shape,
    edge_state_store,
    node_stream,
)
from .node_context import (
    STATE_KEY,
    ContextStateStore,
    default_node_key,
    key_reply,
    node_identity,
)
from .privacy import Defences
from .records import (
    COMPRESSION_KEY,
    CONFIG_KEY,
    FEATURES_KEY,
    LOGITS_KEY,
    META_KEY,
    METRICS_KEY,
    NODE_KEY,
    PRECISION_KEY,
    TEST_FEATURES_KEY,
    TEST_METRICS_KEY,
    features_record,
    record_arrays,
)
from .settings import DEFAULTS
from .validation import EXTRACTOR_KEY

__all__ = [
    "FedGKTClient",
    "ContextStateStore",
    "STATE_KEY",
    "default_node_key",
    "key_reply",
    "node_identity",
]


class FedGKTClient:
    """The edge side of FedGKT: ``train`` and ``evaluate`` handlers for a ClientApp.

    ``train`` restores the edge model from ``context.state``, trains it on
    ``train_data`` with CE + alpha * KD against the server logits that came with
    the message (each sample's target looked up by its sample id), and replies with
    the features, edge logits, labels and sample ids of ``train_data`` in the wire
    dtype the server asked for. ``evaluate`` replies with the features and labels
    of ``test_data`` and the edge model's own accuracy and loss on it.

    Parameters
    ----------
    edge_model : Callable[[], nn.Module]
        Builds the edge model, e.g. the model's class. Its ``forward(x)`` returns
        ``(logits, features)``; the features' shape is the one the strategy was
        given. Seed its initialisation yourself when runs must repeat.
    train_data : EdgeData
        The node's training data: a ``torch.utils.data.Dataset`` or sequence of
        ``(x, y)`` items (the index is the sample id) or ``(x, y, sample_id)``
        items; a flwr-datasets / Hugging Face ``datasets.Dataset`` (or any
        sequence) of dict items such as ``{"img": image, "label": 3}`` (the index
        is the sample id); or a :class:`~flwr_fedgkt.data.SampleSet`. Random
        augmentation in ``__getitem__`` is fine: KD targets follow the sample id.
        Ids only need to be unique within the node. Labels are integer class
        indices. Images that are PIL images become float tensors in [0, 1]
        (torchvision's ``to_tensor``), numpy arrays tensors (float64 as float32).
    test_data : EdgeData | None (default: None)
        The node's test data, in the same form; needed by ``evaluate``.
    image_key : str (default: "img")
        The key of a dict item's image; with the default, an item without
        ``img`` has its image read from ``image``.
    label_key : str (default: "label")
        The key of a dict item's label (e.g. ``"fine_label"`` for CIFAR-100).
    transform : Callable[[Any], Any] | None (default: None)
        Applied to the image of every item (dict or tuple form) before it reaches
        the model, e.g. torchvision's ``Compose([ToTensor(), Normalize(...)])``;
        not with a ``SampleSet`` (give it an ``augmentation``). Leave it None
        when the partition already has one (``partition.with_transform(...)``).
    node_key : str | None (default: None)
        The stable key the server keeps this node's state under (its server
        logits, stored features, sample ids); the node config's ``partition-id``
        when None. Keep it the same across restarts.
    epochs : int (default: 1)
        Local epochs per round.
    lr : float (default: 0.001)
        Learning rate.
    batch_size : int (default: 32)
        Training batch size.
    temperature : float (default: 3.0)
        KD temperature.
    alpha : float (default: 1.0)
        Weight of the KD term.
    optimizer : OptimizerFactory | None (default: None)
        Builds the optimizer from the trainable parameters (its learning rate is
        set to ``lr``); Adam with weight decay 5e-4 when None.
    freeze_extractor : bool (default: False)
        Never train the model's ``extractor`` (or ``stem``) module, so that the
        server may keep the node's first upload of features. Replies name the
        extractor's digest: with ``edge_model`` built from one seed on every node,
        the strategy's ``extractor`` checks it and serves one deployable model.
    device : str (default: "auto")
        ``auto`` uses CUDA when available.
    seed : int (default: 42)
        Seeds the shuffling (with the node key and the round), so runs repeat.
    state_dir : str | None (default: None)
        Also keep the edge state in this directory
        (``edge-<node key>-round-<r>.pt``), so that a restarted node continues
        from it.
    precision : str (default: "auto")
        Training precision: ``float32``, ``bfloat16``, ``float16`` (with a
        gradient scaler; for GPUs) or ``auto`` (bfloat16 where this node's
        hardware runs it natively). Replies say which one was used.
    torch_threads : int (default: 0)
        torch's CPU threads on this node: 0 takes the process's CPUs (a
        simulated ClientApp's ``num-cpus``) less those other processes keep busy.
    feature_noise : float (default: 0.0)
        Gaussian noise on every uploaded feature map, its standard deviation
        ``feature_noise * feature_clip`` (:mod:`flwr_fedgkt.privacy`).
    feature_clip : float (default: 0.0)
        Each uploaded sample's feature map scaled down to this L2 norm (0: not
        clipped; noise needs a clip).
    label_epsilon : float (default: 0.0)
        Labels sent through randomized response with this epsilon (0: as they are).
    nopeek_weight : float (default: 0.0)
        Weight of NoPeek's distance correlation between a batch's images and
        features in the edge's training loss.
    privacy : str (default: "none")
        A named set of defences (:data:`flwr_fedgkt.privacy.PRESETS`:
        ``"none"`` or ``"recommended"``); the four arguments above can raise
        it, never lower it.

    Raises
    ------
    ValueError
        When built, if the first item of ``train_data`` (or of ``test_data``) is
        not of a form above (the message names the keys a dict item has), its
        label is not an integer, the edge model (one built for the check, in eval
        mode, on a batch of that one image) cannot take its image, or the model
        does not return ``(logits, features)``. In ``train`` and ``evaluate``, if
        the features are not of the ``feature-shape`` the server's round config
        names.

    Notes
    -----
    ``epochs``, ``lr``, ``batch_size``, ``temperature`` and ``alpha`` are
    defaults: the round's config from the strategy (``client-epochs``,
    ``client-lr``, ``batch-size``, ``temperature``, ``alpha``) overrides them.
    The defences are the node's own: a round's config may ask for more
    protection (more noise, a smaller label epsilon, a larger NoPeek weight),
    never for less, and every reply names the defences applied.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        edge_model: Callable[[], nn.Module],
        train_data: EdgeData,
        test_data: EdgeData | None = None,
        *,
        image_key: str = "img",
        label_key: str = "label",
        transform: ImageTransform | None = None,
        node_key: str | None = None,
        epochs: int = DEFAULTS.client_epochs,
        lr: float = DEFAULTS.client_lr,
        batch_size: int = DEFAULTS.batch_size,
        temperature: float = DEFAULTS.temperature,
        alpha: float = DEFAULTS.alpha,
        optimizer: OptimizerFactory | None = None,
        freeze_extractor: bool = DEFAULTS.freeze_extractor,
        device: str = DEFAULTS.device,
        seed: int = DEFAULTS.seed,
        state_dir: str | None = None,
        precision: str = DEFAULTS.precision,
        torch_threads: int = DEFAULTS.torch_threads,
        feature_noise: float = DEFAULTS.feature_noise,
        feature_clip: float = DEFAULTS.feature_clip,
        label_epsilon: float = DEFAULTS.label_epsilon,
        nopeek_weight: float = DEFAULTS.nopeek_weight,
        privacy: str = DEFAULTS.privacy,
    ) -> None:
        self.edge_model = edge_model
        self.defences = Defences.over_preset(
            privacy, feature_noise, feature_clip, label_epsilon, nopeek_weight
        )
        self.torch_threads = torch_threads
        self.train_data = train_data
        self.test_data = test_data
        self.node_key = node_key
        self.settings = EdgeSettings(epochs, lr, batch_size, temperature, alpha)
        self.optimizer = optimizer
        self.freeze_extractor = freeze_extractor
        self.device = device
        self.seed = seed
        self.state_dir = state_dir
        self.precision = precision
        self.image_key = image_key
        self.label_key = label_key
        self.transform = transform
        self._train_samples = self._readable(train_data)
        self._test_samples = None if test_data is None else self._readable(test_data)
        self._check_data()

    def _readable(self, data: EdgeData) -> EdgeData:
        """``data`` as the edge trainer reads it, with this client's keys and
        transform."""
        return readable_data(
            data, image_key=self.image_key, label_key=self.label_key, transform=self.transform
        )

    def _check_data(self) -> None:
        """The first item of each split through one fresh edge model
        (:func:`~flwr_fedgkt.edge_data.check_edge_data`), built without drawing
        from the global RNG, so that the node's own models are built as before."""
        with torch.random.fork_rng(devices=[]):
            model = self.edge_model()
        check_edge_data(model, self._train_samples, "train_data")
        if self._test_samples is not None:
            check_edge_data(model, self._test_samples, "test_data")

    def node(self, context: Context, round_config: Mapping[str, Any] | None = None) -> EdgeNode:
        """This node's round engine, its edge state in ``context.state`` (and
        ``state_dir``), with this node's defences raised to what ``round_config``
        asks for."""
        key = self.key(context)
        asked = Defences.from_meta(dict(round_config or {}))
        return EdgeNode(
            self.edge_model,
            edge_state_store(ContextStateStore(context), self.state_dir, key),
            self.settings,
            seed=self.seed,
            stream=node_stream(key),
            device=self.device,
            freeze_extractor=self.freeze_extractor,
            optimizer=self.optimizer,
            precision=self.precision,
            torch_threads=self.torch_threads,
            defences=self.defences.at_least(asked),
        )

    def key(self, context: Context) -> str:
        """The node key: ``node_key``, else the node config's ``partition-id``."""
        return self.node_key if self.node_key is not None else default_node_key(context.node_config)

    def query(self, msg: Message, context: Context) -> Message:
        """Tell the server this node's key, with its proof (:func:`key_reply`)."""
        return key_reply(msg, self.key(context), context, self.state_dir)

    def train(self, msg: Message, context: Context) -> Message:
        """One round of edge training, then the upload of the training data's
        features (unless the server holds them unchanged), logits, labels and ids;
        when the server asks (``test-features``) and the node has test data, the
        test data's upload too, extracted by the model just trained, so that the
        round needs no evaluation message to this node."""
        began = time.perf_counter()
        round_config = _round_config(msg)
        ins = RoundInstructions.from_config(round_config)
        teacher = None
        if LOGITS_KEY in msg.content.array_records:
            arrays = record_arrays(msg.content.array_records[LOGITS_KEY])
            teacher = LogitTable(arrays["ids"], arrays["logits"])
        node = self.node(context, round_config)
        settings = self.settings.for_round(round_config)
        test: tuple[Extracted, dict[str, float]] | None = None
        if ins.with_test and self._test_samples is not None:
            extracted, metrics, tested, scores = node.train_and_test(
                self._train_samples,
                self._test_samples,
                ins.server_round,
                teacher,
                settings,
                frozen=ins.frozen,
            )
            test = (tested, scores)
        else:
            extracted, metrics = node.train(
                self._train_samples, ins.server_round, teacher, settings, frozen=ins.frozen
            )
        check_feature_shape(extracted, ins.feature_shape)
        encoding = time.perf_counter()
        content = RecordDict({FEATURES_KEY: features_record(extracted, ins)})
        if test is not None:
            content[TEST_FEATURES_KEY] = features_record(test[0], ins.for_test(), with_logits=False)
            content[TEST_METRICS_KEY] = MetricRecord(
                {"num-examples": len(test[0].ids), **evaluate_metrics(test[1])}
            )
        metrics["encode_seconds"] = time.perf_counter() - encoding
        meta = {**self._meta(msg, context, ins, node), PRECISION_KEY: node.precision}
        metrics = {"num-examples": len(extracted.ids), **train_metrics(metrics)}
        return _reply(msg, content, metrics, meta, began)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """The upload of the test data's features (unless the server holds them
        unchanged) and labels, with the edge model's own accuracy and loss on them."""
        began = time.perf_counter()
        if self._test_samples is None:
            raise ValueError("FedGKTClient needs test_data to evaluate")
        round_config = _round_config(msg)
        ins = RoundInstructions.from_config(round_config)
        node = self.node(context, round_config)
        extracted, scores = node.evaluate(self._test_samples, ins.server_round)
        check_feature_shape(extracted, ins.feature_shape)
        extracting = time.perf_counter()
        content = RecordDict({FEATURES_KEY: features_record(extracted, ins, with_logits=False)})
        metrics = {
            "num-examples": len(extracted.ids),
            **evaluate_metrics(scores),
            "edge-encode-seconds": time.perf_counter() - extracting,
        }
        return _reply(msg, content, metrics, self._meta(msg, context, ins, node), began)

    def _meta(
        self, msg: Message, context: Context, ins: RoundInstructions, node: EdgeNode
    ) -> dict[str, Any]:
        """What every reply echoes back (its round, feature dtype and compression),
        with the node's key and its proof and, for a frozen extractor, its digest
        (a strategy whose nodes share one extractor checks it)."""
        key = self.key(context)
        identity = node_identity(context, key, self.state_dir)
        meta: dict[str, Any] = {
            "server-round": ins.server_round,
            "feature-dtype": ins.dtype,
            COMPRESSION_KEY: ins.compression,
            NODE_KEY: key,
            **identity.prove(_kind(msg), key, msg.metadata.dst_node_id, ins.server_round),
        }
        if node.extractor_digest is not None:
            meta[EXTRACTOR_KEY] = node.extractor_digest
        meta.update(node.defences.meta())
        return meta


def _kind(msg: Message) -> str:
    """``train`` or ``evaluate`` (a message type may name an action after a dot)."""
    return msg.metadata.message_type.split(".", 1)[0]


def _round_config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(CONFIG_KEY, ConfigRecord())


def _reply(
    msg: Message,
    content: RecordDict,
    metrics: Mapping[str, Any],
    meta: Mapping[str, Any],
    began: float,
) -> Message:
    """The reply: ``content`` (the uploads), the metrics with the seconds since the
    handler ``began`` (``node-seconds``), the meta record."""
    content[METRICS_KEY] = MetricRecord({**metrics, "node-seconds": time.perf_counter() - began})
    content[META_KEY] = ConfigRecord(dict(meta))
    return Message(content=content, reply_to=msg)
