"""The built-in app on Flower's simulation engine with every defence on: the nodes
apply them, the server accepts every honest reply, and results.json names the
defences and the privacy spent, round by round."""

import json
import math

import pytest
from flower_processes import REPO, flwr_run

from flwr_fedgkt.privacy import gaussian_epsilon, keep_probability

pytestmark = pytest.mark.e2e

NOISE, CLIP, LABEL_EPSILON = 2.0, 10.0, 2.0


def test_a_run_with_every_defence_records_what_left_the_nodes(flower_federation) -> None:
    # Prepare
    env, home = flower_federation
    out = home / "privacy"
    config = (
        "num-server-rounds=2 dataset='synthetic' synthetic-samples-per-node=60 batch-size=16 "
        f"feature-clip={CLIP} feature-noise={NOISE} label-epsilon={LABEL_EPSILON} "
        f"nopeek-weight=0.5 torch-threads=2 seed=3 output-dir='{out}'"
    )
    # Execute
    result = flwr_run(env, REPO, config, num_supernodes=2)
    # Assert: completed, nothing honest rejected; each round's record names the
    # four defences, the releases so far (one training and one test upload per
    # round), epsilon at delta 1e-5 for that many releases at noise 2, and the
    # flip probability of label epsilon 2 over the 10 classes
    assert result.returncode == 0 and "Exit Code" not in result.stdout, result.stdout[-4000:]
    written = json.loads((out / "results.json").read_text())
    assert written["status"] == "completed"
    flip = 1 - keep_probability(LABEL_EPSILON, 10)
    for number, record in enumerate(written["rounds"], start=1):
        privacy = record["privacy"]
        assert record["rejected_replies"] == [] and record["eval_nodes"] == 2
        assert privacy["defences"] == [
            "feature-clip",
            "feature-noise",
            "label-epsilon",
            "nopeek-weight",
        ]
        assert privacy["releases_max"] == number
        assert privacy["epsilon"] == pytest.approx(gaussian_epsilon([(NOISE, number)]))
        assert privacy["delta"] == 1e-5 and privacy["label_flip"] == pytest.approx(flip)
        assert 0.0 <= record["accuracy"] <= 1.0 and math.isfinite(record["loss"])
    assert "privacy: feature-clip, feature-noise, label-epsilon, nopeek-weight" in result.stdout
