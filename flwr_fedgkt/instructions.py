"""What the server's round config tells a node besides training settings, and
the check of a node's features against the shape the server takes.

This module imports no Flower code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .compression import check_compression
from .edge import Extracted
from .edge_data import shape_text
from .settings import boolean

__all__ = ["RoundInstructions", "parse_feature_shape", "check_feature_shape"]


@dataclass(frozen=True)
class RoundInstructions:
    """What the server's round config tells a node besides training settings.

    Parameters
    ----------
    server_round : int
        The round (replies echo it).
    dtype : str
        The features' wire dtype (replies echo it).
    compression : str (default: "none")
        The codec of the uploaded feature bytes (:mod:`flwr_fedgkt.compression`).
    frozen : bool (default: False)
        Train this round with the extractor frozen (``freeze-extractor``,
        ``freeze-after``).
    held : str (default: "")
        The digest of the features the server holds for this node (of this split):
        features with that digest are not sent again.
    feature_shape : tuple[int, ...] | None (default: None)
        The shape of one sample's features that the server model takes
        (``feature-shape``, e.g. ``16x32x32``): a node checks its features against
        it before it replies (:func:`check_feature_shape`). None (a server that
        does not send it) means no check.
    with_test : bool (default: False)
        A training instruction that also asks for the test split's upload, made
        right after training (``test-features``), so that the round needs no
        evaluation message to this node.
    held_test : str (default: "")
        The digest of the test features the server holds (``held-test-features``).
    """

    server_round: int
    dtype: str
    compression: str = "none"
    frozen: bool = False
    held: str = ""
    feature_shape: tuple[int, ...] | None = None
    with_test: bool = False
    held_test: str = ""

    def for_test(self) -> RoundInstructions:
        """These instructions for the test split's upload in a training reply."""
        return dataclasses.replace(self, held=self.held_test, with_test=False, held_test="")

    @classmethod
    def from_config(cls, round_config: Mapping[str, Any], dtype: str = "int8") -> RoundInstructions:
        """Read a round's config from the server (``dtype`` when it names none);
        ValueError names a value that is wrong."""
        compression = str(round_config.get("compression", "none"))
        check_compression(compression)
        return cls(
            server_round=int(round_config.get("server-round", 0)),
            dtype=str(round_config.get("feature-dtype", dtype)),
            compression=compression,
            frozen=boolean(round_config.get("freeze-extractor", False)),
            held=str(round_config.get("held-features", "")),
            feature_shape=parse_feature_shape(round_config.get("feature-shape")),
            with_test=boolean(round_config.get("test-features", False)),
            held_test=str(round_config.get("held-test-features", "")),
        )


def parse_feature_shape(text: Any) -> tuple[int, ...] | None:
    """A round config's ``feature-shape`` (``16x32x32``, ``6``) as a tuple; None
    when absent or empty. ValueError names a value that is not such a shape."""
    if text is None or str(text).strip() == "":
        return None
    parts = str(text).strip().lower().split("x")
    if not all(part.strip().isdecimal() and int(part) > 0 for part in parts):
        raise ValueError(
            f"the round config's feature-shape {text!r} is not a shape such as '16x32x32' or '6'"
        )
    return tuple(int(part) for part in parts)


def check_feature_shape(extracted: Extracted, expected: tuple[int, ...] | None) -> None:
    """ValueError when one sample's features in ``extracted`` are not of the shape
    the server takes (``expected``; None: not known, nothing to check; no
    samples: nothing to compare)."""
    if expected is None or len(extracted.ids) == 0:
        return
    got = tuple(extracted.features.shape[1:])
    if got != tuple(expected):
        raise ValueError(
            f"features are {shape_text(got)}; the server takes {shape_text(expected)}: cut the "
            "edge model where the server model starts, or give FedGKT the feature_shape the "
            "edge produces"
        )
