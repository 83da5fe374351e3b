"""Who is in the federation: node keys bound to Flower node ids, which nodes to
ask for their key, and the seeded sampling of nodes.

This module imports no Flower code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection
from typing import Any

from .codec import NodeKey, PayloadError
from .registry import KeyProof, NodeRegistry, SampleIds
from .validation import validate_node_key

__all__ = ["Membership"]

logger = logging.getLogger("flwr.fedgkt")


class Membership:
    """The nodes of a run: their keys (:class:`~flwr_fedgkt.registry.NodeRegistry`),
    the ones that cannot say theirs, and sampling.

    Parameters
    ----------
    global_sample_ids : bool
        Sample ids are unique across all nodes (see ``NodeRegistry``).
    seed : int
        Seeds the sampling of nodes.
    sample_ids : SampleIds | None (default: None)
        The ids of each key's partition (see ``NodeRegistry``).
    """

    def __init__(
        self, global_sample_ids: bool, seed: int, sample_ids: SampleIds | None = None
    ) -> None:
        self.registry = NodeRegistry(global_sample_ids, sample_ids)
        self.sampler = random.Random(seed)
        self.keyless: set[int] = set()  # nodes that could not say their key
        self.connected: Callable[[], Collection[int]] = tuple

    def sample(self, node_ids: Collection[int], size: int) -> list[int]:
        """``size`` of the connected ``node_ids``, drawn from the seeded generator
        (seeded by ``seed``). Nodes whose key the server knows are drawn by key
        (node ids change when a federation restarts, keys do not), the others by
        node id after them: the same keys (or node ids) give the same sample in
        every run, and a resumed run samples as the uninterrupted one."""
        keyed = sorted((k, n) for n in node_ids if (k := self.registry.key_of(n)) is not None)
        candidates = [n for _, n in keyed] + self.unkeyed(node_ids)
        return sorted(self.sampler.sample(candidates, size))

    def unkeyed(self, node_ids: Collection[int]) -> list[int]:
        """The ``node_ids`` whose node key the server does not know yet."""
        return sorted(n for n in node_ids if self.registry.key_of(n) is None)

    def keys_to_ask(self, node_ids: Collection[int]) -> list[int]:
        """The ``node_ids`` to ask for their key: those whose key the server does
        not know, but for the ones that could not say it before
        (:meth:`no_key`)."""
        return [n for n in self.unkeyed(node_ids) if n not in self.keyless]

    def no_key(self, node_ids: Collection[int]) -> None:
        """These nodes could not say their key (e.g. a ClientApp without a query
        handler): they are not asked again, and are bound to the key of their
        first accepted reply."""
        self.keyless.update(node_ids)

    def learn_key(self, node_id: int, key: Any, proof: KeyProof | None = None) -> NodeKey | None:
        """Bind ``node_id`` to the node key it answered a key query with (and the
        key to the public key of its ``proof`` when nobody proved it before), so
        that it is sampled by key and gets its own server logits from its first
        round on (also the first round of a resumed run, whose node ids are new).
        A key that is not valid, that another node proved, or that another
        connected node holds unproven, is logged and not bound (None)."""
        try:
            key = validate_node_key(key)
            self.registry.check_binding(key, node_id, self.connected(), proof)
        except PayloadError as err:
            logger.warning("node %s's key is not taken: %s", node_id, err)
            return None
        moved = self.registry.commit(key, node_id, proof=proof)
        if moved is not None:
            logger.info("node key %r moved from node %d (gone) to node %d", key, moved, node_id)
        return key
