"""Simulated stragglers: nodes whose training takes ``slowdown`` times as long.

A slow node holds its reply back for ``(slowdown - 1)`` times its training time
after training, using no CPU meanwhile, so that one machine can show what slow
or uneven devices do to a federation. The built-in ClientApp and the FedAvg
baseline read ``slow-partitions`` and ``slowdown`` from the run config against
their ``partition-id``; a node's own ``--node-config slowdown=...`` overrides them.

This module imports no Flower code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .settings import ConfigError, RunConfig

__all__ = ["node_slowdown", "straggle"]


def node_slowdown(config: RunConfig, node_config: Mapping[str, Any]) -> float:
    """How many times as long this node's training takes (simulated stragglers):
    the node config's ``slowdown`` when it has one, else the run config's
    ``slowdown`` for a partition in ``slow-partitions``, else 1. ValueError names
    a node-config value that is not a number of at least 1."""
    if "slowdown" in node_config:  # checked as the run config's own slowdown is
        try:
            return RunConfig.from_mapping({"slowdown": node_config["slowdown"]}).slowdown
        except ConfigError as err:
            raise ValueError(f"node config slowdown: {err}") from None
    partition = node_config.get("partition-id")
    if partition is not None and int(partition) in config.slow_partition_ids:
        return config.slowdown
    return 1.0


def straggle(
    slowdown: float, train_seconds: float, sleep: Callable[[float], None] | None = None
) -> float:
    """Wait ``(slowdown - 1) x train_seconds`` (a simulated slow node: it holds
    its reply back as if its training had taken ``slowdown`` times as long, and
    uses no CPU meanwhile). Returns the seconds waited."""
    wait = max(0.0, (slowdown - 1.0) * max(0.0, train_seconds))
    if wait > 0:
        (sleep or time.sleep)(wait)
    return wait
