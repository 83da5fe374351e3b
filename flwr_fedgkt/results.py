"""``results.json``: the run's config, model sizes and one record per round.

Written atomically (temporary file, then rename) after every round, so a crash
keeps every finished round and never leaves a half-written file. Next to it,
``accuracy.png`` shows the server model's and the edge models' test accuracy by
round, redrawn with every round.

This module imports no Flower code.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ResultsWriter", "write_json_atomic", "accuracy_figure", "plot_accuracy"]

logger = logging.getLogger("flwr.fedgkt")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON (:func:`_clean` first) at ``path``, written atomically and
    synced to disk."""
    text = json.dumps(_clean(data), indent=2)
    write_atomic(path, lambda handle: handle.write(text.encode()), fsync=True)


def accuracy_figure(rounds: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """A figure of ``accuracy`` (the server model on the nodes' test features) and
    ``edge_accuracy`` (the edge models' own) by ``round``, one line each; rounds
    without a finite value are left out of that line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label in (("accuracy", "server model"), ("edge_accuracy", "edge models")):
        points = [
            (r["round"], r[key])
            for r in rounds
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    if axes.get_lines():
        axes.legend(loc="best")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure


def plot_accuracy(rounds: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """:func:`accuracy_figure` as a PNG at ``path``, replaced atomically."""
    figure = accuracy_figure(rounds, title)
    write_atomic(path, lambda handle: figure.savefig(handle, format="png"))
    return path


class ResultsWriter:
    """Collects round records and rewrites ``<output_dir>/results.json`` each round.

    ``status`` says how far the run got: ``running`` until :meth:`finish` records
    ``completed`` or ``failed`` (with the ``error``). ``accuracy.png`` is redrawn
    with the rounds (a plot that cannot be drawn is logged, never fatal).
    """

    def __init__(self, output_dir: str | Path, header: dict[str, Any]) -> None:
        self.path = Path(output_dir) / "results.json"
        self.plot_path = Path(output_dir) / "accuracy.png"
        self.header = dict(header)
        self.rounds: list[dict[str, Any]] = []
        self.status = "running"
        self.error: str | None = None
        self.write()

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds.append(dict(record))
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        """Record how the run ended (``completed``, ``failed``, ...) and write."""
        self.status, self.error = status, error
        self.write()

    def write(self) -> None:
        ending = {"status": self.status}
        if self.error is not None:
            ending["error"] = self.error
        write_json_atomic(self.path, {**self.header, **ending, "rounds": self.rounds})
        if self.rounds:
            try:
                plot_accuracy(self.rounds, self.plot_path, str(self.header.get("algorithm", "")))
            except (OSError, ValueError, RuntimeError) as err:
                logger.warning("accuracy.png not drawn: %s", err)
