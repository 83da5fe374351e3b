"""``accuracy.png`` next to ``results.json``: the server's and the edges' test
accuracy by round, redrawn with every round."""

import json

import numpy as np
from matplotlib.image import imread

from flwr_fedgkt.results import ResultsWriter, accuracy_figure

ROUNDS = [
    {"round": 1, "accuracy": 0.5, "edge_accuracy": 0.25},
    {"round": 2, "accuracy": None, "edge_accuracy": 0.4},
    {"round": 3, "accuracy": 0.875, "edge_accuracy": float("nan")},
]


def test_the_figure_draws_each_accuracy_by_round_leaving_out_missing_values() -> None:
    # Execute
    figure = accuracy_figure(ROUNDS)
    # Assert: one line per quantity, with the hand-picked values
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    server, edge = lines["server model"], lines["edge models"]
    np.testing.assert_array_equal(server.get_xdata(), [1, 3])
    np.testing.assert_array_equal(server.get_ydata(), [0.5, 0.875])
    np.testing.assert_array_equal(edge.get_xdata(), [1, 2])
    np.testing.assert_array_equal(edge.get_ydata(), [0.25, 0.4])


def test_the_writer_draws_the_plot_beside_results_json_with_every_round(tmp_path) -> None:
    # Prepare
    writer = ResultsWriter(tmp_path, {"algorithm": "fedgkt"})
    assert not (tmp_path / "accuracy.png").exists(), "a plot before any round"
    # Execute
    writer(ROUNDS[0])
    first = (tmp_path / "accuracy.png").read_bytes()
    writer(ROUNDS[2])
    # Assert: a PNG image, redrawn after the second round; results.json has both
    image = imread(tmp_path / "accuracy.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert (tmp_path / "accuracy.png").read_bytes() != first
    assert [r["round"] for r in json.loads((tmp_path / "results.json").read_text())["rounds"]] == [
        1,
        3,
    ]
    assert not list(tmp_path.glob(".*tmp")), "a temporary file was left behind"
