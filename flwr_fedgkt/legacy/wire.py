"""What the legacy API's messages carry, and how the server reads the replies.

Server -> client, ``FitIns``
    ``parameters``: ``[ids, logits]``, the node's server logits keyed by sample id
    (``(N,)`` int64 and ``(N, K)`` float32); ``[]`` before the node's first round.
    ``config``: ``server-round``, ``feature-dtype``, ``compression`` (always
    ``none``), ``freeze-extractor``, ``held-features``, and the strategy's
    ``on_fit_config_fn`` entries.
Client -> server, ``FitRes`` (what :meth:`FedGKTNumPyClient.fit` returns)
    ``parameters``: the arrays named by :data:`FIT_ARRAYS`, in that order --
    ``features`` ``(N, *feature_shape)`` in the wire dtype (``float16``;
    ``bfloat16`` as its raw bits in ``int16``; ``uint8`` codes for ``int8``),
    ``logits`` ``(N, K)`` float32, ``labels`` ``(N,)`` int64, ``ids`` ``(N,)``
    int64 -- followed, for ``int8`` only, by :data:`INT8_ARRAYS`
    (``feature_scale``, ``feature_offset``, one float32 per feature channel each).
    ``num_examples``: ``N``. ``metrics``: ``server-round``, ``feature-dtype``,
    ``node-key``, ``train-loss``, ``train-accuracy``.
Server -> client, ``EvaluateIns``
    ``parameters``: ``[]``; ``config``: as for ``FitIns``, with the strategy's
    ``on_evaluate_config_fn`` entries.
Client -> server, ``EvaluateRes``
    ``loss``: the edge model's test loss; ``num_examples``: test samples.
    ``metrics``: ``server-round``, ``feature-dtype``, ``node-key``, ``edge-accuracy``,
    ``edge-loss`` and the test split's ``features``, ``labels``, ``ids`` (and for
    ``int8`` ``feature_scale``, ``feature_offset``) as ``.npy`` bytes under
    ``array.<name>``: a legacy ``EvaluateRes`` has no other room for arrays.

The server validates every reply exactly as the Message-API strategy does; a bad
reply is rejected with its reason in the round's record and touches neither the
feature store nor the server model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.common import EvaluateRes, FitRes, Parameters, Scalar, bytes_to_ndarray
from flwr.server.client_proxy import ClientProxy

from ..codec import PayloadError
from ..validation import ReplyParts

__all__ = [
    "FIT_ARRAYS",
    "INT8_ARRAYS",
    "EVALUATE_ARRAYS",
    "EVALUATE_ARRAY_PREFIX",
    "EvaluateReply",
    "FitReply",
]

FIT_ARRAYS = ("features", "logits", "labels", "ids")
"""Names of the arrays a training reply carries, in their order in ``parameters``."""
INT8_ARRAYS = ("feature_scale", "feature_offset")
"""Arrays appended after :data:`FIT_ARRAYS` (and sent on evaluation) for ``int8``."""
EVALUATE_ARRAYS = ("features", "labels", "ids")
"""Names of the arrays an evaluation reply carries (``array.<name>`` metrics)."""
EVALUATE_ARRAY_PREFIX = "array."
"""Prefix of the evaluation reply's metric keys that hold ``.npy`` bytes."""


def array_names(names: Sequence[str], dtype: str) -> tuple[str, ...]:
    """``names``, followed by :data:`INT8_ARRAYS` for ``int8`` features."""
    return tuple(names) + (INT8_ARRAYS if dtype == "int8" else ())


def empty_parameters() -> Parameters:
    """``Parameters`` holding no arrays (no global model exists)."""
    return Parameters(tensors=[], tensor_type="numpy.ndarray")


def parameters_bytes(parameters: Parameters) -> int:
    """The bytes ``parameters`` puts on the wire."""
    return sum(len(tensor) for tensor in parameters.tensors)


def node_id(proxy: ClientProxy) -> int:
    """The Flower node id of a client (its ``cid`` on older proxies)."""
    found = getattr(proxy, "node_id", None)
    return int(found) if found is not None else int(proxy.cid)


def fit_arrays(parameters: Parameters, dtype: str) -> dict[str, np.ndarray]:
    """The named arrays of a training reply (order: :data:`FIT_ARRAYS`)."""
    names = array_names(FIT_ARRAYS, dtype)
    if len(parameters.tensors) != len(names):
        raise PayloadError(
            f"expected {len(names)} arrays ({', '.join(names)}) for {dtype!r} features, "
            f"got {len(parameters.tensors)}"
        )
    return {name: bytes_to_ndarray(t) for name, t in zip(names, parameters.tensors, strict=True)}


def evaluate_arrays(metrics: Mapping[str, Scalar]) -> dict[str, np.ndarray]:
    """The named arrays of an evaluation reply (``array.<name>`` metrics)."""
    arrays = {}
    for key, value in metrics.items():
        if key.startswith(EVALUATE_ARRAY_PREFIX):
            if not isinstance(value, bytes):
                raise PayloadError(f"metric {key!r} holds {type(value).__name__}, not bytes")
            arrays[key[len(EVALUATE_ARRAY_PREFIX) :]] = bytes_to_ndarray(value)
    return arrays


class FitReply:
    """A legacy training reply, read as the engine reads replies."""

    def __init__(self, proxy: ClientProxy, res: FitRes, dtype: str) -> None:
        self.res, self.dtype = res, dtype
        self.node_id = node_id(proxy)
        self.nbytes = parameters_bytes(res.parameters)

    def read(self) -> ReplyParts:
        """Meta values and metrics from ``FitRes.metrics`` (``num-examples`` from
        ``FitRes.num_examples``), arrays from ``FitRes.parameters``."""
        metrics = {**self.res.metrics, "num-examples": self.res.num_examples}
        return self.res.metrics, fit_arrays(self.res.parameters, self.dtype), metrics


class EvaluateReply:
    """A legacy evaluation reply, read as the engine reads replies."""

    def __init__(self, proxy: ClientProxy, res: EvaluateRes) -> None:
        self.res = res
        self.node_id = node_id(proxy)
        self.nbytes = sum(
            len(v)
            for k, v in res.metrics.items()
            if k.startswith(EVALUATE_ARRAY_PREFIX) and isinstance(v, bytes)
        )

    def read(self) -> ReplyParts:
        """Meta values and metrics from ``EvaluateRes.metrics``, arrays from its
        ``array.<name>`` entries."""
        metrics = {**self.res.metrics, "num-examples": self.res.num_examples}
        return self.res.metrics, evaluate_arrays(self.res.metrics), metrics
