"""What a node applies before anything leaves it (flwr_fedgkt.privacy), checked on
what is on the wire: clipped norms, the noise's standard deviation, the
randomized-response rate, the accountant against the analytic Gaussian
mechanism with the release count of a real run, the defences named in replies
and records, and a server that rejects nothing honest because of the noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_message
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from torch import Tensor, nn

from flwr_fedgkt import FedGKTClient
from flwr_fedgkt.accounting import model_profile
from flwr_fedgkt.codec import (
    EncodedFeatures,
    FeaturePayload,
    decode_features,
    encode_features,
    encoded_digest,
)
from flwr_fedgkt.edge import EdgeTrainer
from flwr_fedgkt.local import local_engine
from flwr_fedgkt.models import build_model, count_parameters
from flwr_fedgkt.privacy import (
    Defences,
    ReleaseLedger,
    clip_features,
    corrected_cross_entropy,
    debiased_accuracy,
    distance_correlation,
    gaussian_epsilon,
    keep_probability,
    randomized_response,
)
from flwr_fedgkt.records import FEATURES_KEY, META_KEY
from flwr_fedgkt.records import record_arrays as arrays_of
from flwr_fedgkt.rounds import RoundEngine
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import ConfigError, RunConfig
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.validation.federation import FederationRange, PayloadRange

CLASSES, WIDTH = 4, 64

pytestmark = pytest.mark.usefixtures("one_thread")


class EdgeNet(nn.Module):
    """A tiny edge model on 8-value inputs: 64 features, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Linear(8, WIDTH), nn.ReLU())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.extractor(x)
        return self.head(features), features


def _items(n: int) -> list[tuple[Tensor, int]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, generator=gen) * 3, i % CLASSES) for i in range(n)]


def _context() -> Context:
    return Context(
        run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(), run_config={}
    )


def _train(client: FedGKTClient, context: Context, server_round: int = 1, **config):
    content = RecordDict(
        {
            "config": ConfigRecord(
                {"server-round": server_round, "feature-dtype": "float32", **config}
            )
        }
    )
    msg = make_message(content, src_node_id=0, dst_node_id=5, message_type=MessageType.TRAIN)
    reply = client.train(msg, context)
    return arrays_of(reply.content.array_records[FEATURES_KEY]), reply


def _clean_features(client: FedGKTClient, context: Context) -> Tensor:
    """The node's features as its newest state extracts them, before any defence."""
    trainer = client.node(context).trainer()
    return trainer.extract(client._train_samples).features


def _synthetic_run(rounds: int, samples: int = 24, **keys: object) -> RoundEngine:
    """The engine after ``rounds`` in-process rounds of two synthetic nodes with
    ``samples`` samples each and the run-config ``keys``."""
    base = {
        "dataset": "synthetic",
        "synthetic-samples-per-node": samples,
        "num-server-rounds": rounds,
        "batch-size": 8,
        "torch-threads": 1,
    }
    return local_engine(RunConfig.from_mapping({**base, **keys}), 2).engine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return EdgeNet()


# -- on the wire -----------------------------------------------------------------------
def test_clipped_features_on_the_wire_are_within_the_clip() -> None:
    # Prepare: a clip below most samples' norm
    items = _items(60)
    clip = 2.0
    client = FedGKTClient(_model, items, feature_clip=clip, batch_size=16)
    context = _context()
    # Execute
    arrays, _ = _train(client, context)
    # Assert: every uploaded row within the clip (float32: exact up to rounding),
    # the rows that were longer scaled down onto it, the shorter ones unchanged
    wire = torch.from_numpy(arrays["features"])
    clean = _clean_features(client, context)
    norms, clean_norms = wire.norm(dim=1), clean.norm(dim=1)
    assert (clean_norms > clip).sum() >= 30  # the clip bites
    assert float(norms.max()) <= clip * (1 + 1e-6)
    longer = clean_norms > clip
    torch.testing.assert_close(norms[longer], torch.full((int(longer.sum()),), clip))
    torch.testing.assert_close(wire[~longer], clean[~longer])


def test_int8_features_stay_within_the_clip_plus_the_codecs_error() -> None:
    # Prepare
    items = _items(60)
    clip = 2.0
    client = FedGKTClient(_model, items, feature_clip=clip, batch_size=16)
    # Execute
    arrays, _ = _train(client, _context(), **{"feature-dtype": "int8"})
    # Assert: a decoded row's norm is at most the clip plus the norm of the worst
    # quantisation error, half a step of its channel in every element
    encoded = EncodedFeatures(
        "int8", arrays["features"], arrays["feature_scale"], arrays["feature_offset"]
    )
    decoded = decode_features(encoded)
    error_bound = float(np.sqrt(np.sum((arrays["feature_scale"] / 2) ** 2)))
    assert float(decoded.norm(dim=1).max()) <= clip + error_bound
    assert error_bound < 0.1 * clip  # the bound says something


def test_the_noise_on_the_wire_has_the_configured_standard_deviation() -> None:
    # Prepare: 300 samples x 64 values of noise at sigma = 0.5 x clip 3.0
    items = _items(300)
    noise, clip = 0.5, 3.0
    client = FedGKTClient(_model, items, feature_noise=noise, feature_clip=clip, batch_size=32)
    context = _context()
    # Execute
    arrays, reply = _train(client, context)
    # Assert: what the wire carries minus the clipped clean features is Gaussian
    # noise of standard deviation 1.5: its sample sd within 5 standard errors
    # (sd / sqrt(2n)), its mean within 5 of its own (sd / sqrt(n))
    drawn = torch.from_numpy(arrays["features"]) - clip_features(
        _clean_features(client, context), clip
    )
    n = drawn.numel()
    expected = noise * clip
    assert abs(float(drawn.std()) - expected) <= 5 * expected / math.sqrt(2 * n)
    assert abs(float(drawn.mean())) <= 5 * expected / math.sqrt(n)
    meta = reply.content.config_records[META_KEY]
    assert meta["privacy-feature-noise"] == noise and meta["privacy-feature-clip"] == clip


def test_the_noise_comes_from_the_nodes_own_secret_not_the_run_seed() -> None:
    # Prepare: two nodes of the same seed, model and data
    items = _items(40)
    make = lambda: FedGKTClient(  # noqa: E731
        _model, items, feature_noise=1.0, feature_clip=1.0, epochs=0, seed=7
    )
    # Execute
    first, _ = _train(make(), _context())
    second, _ = _train(make(), _context())
    # Assert: the same clean features, different noise (a server knowing the seed
    # cannot replay it)
    assert not np.allclose(first["features"], second["features"])


def test_a_frozen_extractor_sends_the_same_noisy_features_once() -> None:
    # Prepare
    items = _items(40)
    client = FedGKTClient(_model, items, feature_noise=1.0, feature_clip=1.0, freeze_extractor=True)
    context = _context()
    # Execute: round 1, then round 2 told the digest of what the server holds
    first, _ = _train(client, context, 1)
    again, _ = _train(client, context, 2)  # not told: sends them, identical
    held = encoded_digest(encode_features(torch.from_numpy(first["features"]), "float32"))
    third, _ = _train(client, context, 3, **{"held-features": held})
    # Assert: one release: the same noise every round, and nothing sent once held
    np.testing.assert_array_equal(first["features"], again["features"])
    assert "features" not in third


def test_randomized_response_flips_at_the_configured_rate() -> None:
    # Prepare
    n, classes, epsilon = 20_000, 10, 1.0
    labels = torch.arange(n) % classes
    # Execute
    noisy = randomized_response(labels, epsilon, classes, torch.Generator().manual_seed(0))
    # Assert: kept with e / (e + 9) = 0.2320 (within 5 standard errors), and the
    # flips spread evenly over the 9 other classes
    keep = math.e / (math.e + classes - 1)
    assert keep_probability(epsilon, classes) == pytest.approx(keep)
    kept = float((noisy == labels).float().mean())
    assert abs(kept - keep) <= 5 * math.sqrt(keep * (1 - keep) / n)
    shifts = ((noisy - labels) % classes)[noisy != labels]
    counts = torch.bincount(shifts, minlength=classes)[1:].float()
    share = counts / counts.sum()
    assert counts.sum() > 0 and float((share - 1 / 9).abs().max()) <= 5 * math.sqrt(
        (1 / 9) * (8 / 9) / float(counts.sum())
    )


def test_a_nodes_noisy_labels_are_drawn_once() -> None:
    # Prepare: label epsilon 0.5 over 4 classes keeps 0.355 of the labels
    items = _items(400)
    client = FedGKTClient(_model, items, label_epsilon=0.5)
    context = _context()
    truth = np.array([y for _, y in items])
    # Execute: two rounds
    first, reply = _train(client, context, 1)
    second, _ = _train(client, context, 2)
    # Assert: the rate, and the same noisy labels both times (sending them again
    # reveals nothing new)
    keep = keep_probability(0.5, CLASSES)
    kept = float((first["labels"] == truth).mean())
    assert abs(kept - keep) <= 5 * math.sqrt(keep * (1 - keep) / len(truth))
    np.testing.assert_array_equal(first["labels"], second["labels"])
    assert reply.content.config_records[META_KEY]["privacy-label-epsilon"] == 0.5


def test_the_server_can_ask_for_more_protection_never_less() -> None:
    # Prepare: a node with noise 0.5 (clip 2)
    items = _items(20)
    client = FedGKTClient(_model, items, feature_noise=0.5, feature_clip=2.0, epochs=0)
    # Execute: a round asks for less, another for more and for label DP
    asked_less = {"privacy-feature-noise": 0.1, "privacy-feature-clip": 9.0}
    _, less = _train(client, _context(), 1, **asked_less)
    _, more = _train(
        client,
        _context(),
        1,
        **{"privacy-feature-noise": 2.0, "privacy-feature-clip": 9.0, "privacy-label-epsilon": 1.0},
    )
    # Assert: the node's own where it is stronger, the request where that is
    less_meta, more_meta = (
        less.content.config_records[META_KEY],
        more.content.config_records[META_KEY],
    )
    assert less_meta["privacy-feature-noise"] == 0.5 and "privacy-label-epsilon" not in less_meta
    assert less_meta["privacy-feature-clip"] == 2.0  # the node's own clip
    assert more_meta["privacy-feature-noise"] == 2.0 and more_meta["privacy-label-epsilon"] == 1.0
    assert more_meta["privacy-feature-clip"] == 2.0


# -- the server's side -----------------------------------------------------------------
def test_the_corrected_loss_and_the_debiased_accuracy_by_hand() -> None:
    # Prepare: 2 classes, logits giving p = (0.8, 0.2); labels kept with 0.75
    logits = torch.tensor([[math.log(4.0), 0.0]])
    # Execute / Assert: P(noisy = 0) = 0.8 * 0.75 + 0.2 * 0.25 = 0.65
    loss = corrected_cross_entropy(logits, torch.tensor([0]), 0.75)
    assert float(loss) == pytest.approx(-math.log(0.65))
    assert float(corrected_cross_entropy(logits, torch.tensor([0]), 1.0)) == pytest.approx(
        -math.log(0.8)
    )
    # 10 classes kept with 0.5: a correct prediction agrees with 0.5, a wrong one
    # with 0.5 / 9; an agreement of 0.3 means (0.3 - 1/18) / (0.5 - 1/18) = 0.55
    assert debiased_accuracy(0.3, 0.5, 10) == pytest.approx(0.55)
    assert debiased_accuracy(0.5, 0.5, 10) == pytest.approx(1.0)


def test_distance_correlation_of_a_transform_and_of_independent_samples() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    # in one dimension: independent samples near 0, and x^2, uncorrelated with x
    # but a function of it, far from 0
    one = torch.randn(300, 1, generator=gen)
    assert float(distance_correlation(one, torch.randn(300, 1, generator=gen))) < 0.15
    assert abs(float(torch.corrcoef(torch.cat([one, one**2], 1).T)[0, 1])) < 0.15
    assert float(distance_correlation(one, one**2)) > 0.4
    assert float(distance_correlation(x[:1], x[:1])) == 0.0


def test_nopeek_makes_features_say_less_about_the_inputs() -> None:
    # Prepare: the same model and data, trained with and without NoPeek
    items = _items(200)
    images = torch.stack([x for x, _ in items])

    def dcor_after(weight: float) -> float:
        trainer = EdgeTrainer(model=_model(), lr=0.01, device="cpu", precision="float32")
        trainer.train(
            items,
            epochs=15,
            batch_size=50,
            nopeek_weight=weight,
            generator=torch.Generator().manual_seed(0),
        )
        return float(distance_correlation(images, trainer.extract(items).features))

    # Execute / Assert
    assert dcor_after(5.0) < dcor_after(0.0) - 0.1


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Epsilon of the Gaussian mechanism (sensitivity 1, noise sigma) at delta:
    the root of delta = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps
    sigma) (Balle and Wang, ICML 2018), by bisection."""

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    def delta_of(eps: float) -> float:
        return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)

    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return (low + high) / 2


def test_the_accountant_matches_the_analytic_gaussian_mechanism_over_a_real_runs_releases() -> None:
    # Prepare: three rounds of two synthetic nodes with noise 3.0
    keys = {"feature-dtype": "float16", "feature-noise": 3.0, "feature-clip": 10.0}
    # Execute
    engine = _synthetic_run(3, **keys)
    history = engine.history
    # Assert: k releases per node, as many as rounds; epsilon at delta 1e-5 is
    # the analytic value at sigma / sqrt(k)
    ledger = engine.step.ledger
    k = ledger.count("0", "train")
    assert k == 3 and ledger.count("0", "test") == 3
    expected = _analytic_gaussian_epsilon(3.0 / math.sqrt(k), 1e-5)
    assert ledger.epsilon("0") == pytest.approx(expected, rel=1e-2)
    assert history[-1]["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-2)
    assert history[-1]["privacy"]["defences"] == ["feature-clip", "feature-noise"]
    assert [r["privacy"]["releases_max"] for r in history] == [1, 2, 3]
    assert all(r["rejected_replies"] == [] for r in history)


def test_a_frozen_extractor_releases_its_training_features_once() -> None:
    # Prepare
    keys = {"feature-noise": 3.0, "feature-clip": 10.0, "freeze-extractor": True}
    # Execute
    engine = _synthetic_run(3, **keys)
    history = engine.history
    # Assert: one release of each split, however many rounds
    ledger = engine.step.ledger
    assert ledger.count("0", "train") == 1 and ledger.count("0", "test") == 1
    assert history[-1]["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon([(3.0, 1)]))


def test_the_ledger_takes_the_worse_split_and_knows_no_bound_without_noise() -> None:
    ledger = ReleaseLedger()
    assert ledger.worst() is None
    for _ in range(4):
        ledger.record("a", "train", 2.0)
    ledger.record("a", "test", 2.0)
    assert ledger.epsilon("a") == pytest.approx(gaussian_epsilon([(2.0, 4)]))
    ledger.record("b", "train", 0.0)
    assert math.isinf(ledger.worst())
    restored = ReleaseLedger()
    restored.load_state(ledger.state())
    assert restored.count("a") == 4 and restored.epsilon("a") == ledger.epsilon("a")


def test_defences_check_their_values_and_combine_toward_more_protection() -> None:
    with pytest.raises(ValueError, match="needs feature-clip"):
        Defences(feature_noise=1.0)
    with pytest.raises(ValueError, match="label-epsilon"):
        Defences(label_epsilon=0.001)
    mine = Defences(feature_noise=0.5, feature_clip=2.0, label_epsilon=4.0)
    asked = Defences(feature_noise=1.0, feature_clip=9.0, label_epsilon=8.0, nopeek_weight=0.1)
    assert mine.at_least(asked) == Defences(1.0, 2.0, 4.0, 0.1)
    assert not mine.covers(asked) and mine.at_least(asked).covers(asked)
    assert Defences.from_meta(mine.meta()) == mine


def test_the_privacy_preset_is_a_floor_the_defence_keys_can_only_raise() -> None:
    # Prepare: the preset alone; with more noise and a weaker label epsilon; a
    # node's own clip; and a name that is no preset
    preset = RunConfig.from_mapping({"privacy": "recommended"}).defences
    stronger = RunConfig.from_mapping(
        {"privacy": "recommended", "feature-noise": 0.05, "label-epsilon": 8.0}
    ).defences
    own_clip = FedGKTClient(_model, _items(4), privacy="recommended", feature_clip=3.0)
    # Assert: every defence of the preset in force; more noise kept, the weaker
    # epsilon replaced by the preset's; the node's own clip kept
    assert preset == Defences(0.005, 50.0, 4.0)
    assert stronger == Defences(0.05, 50.0, 4.0)
    assert own_clip.defences == Defences(0.005, 3.0, 4.0)
    assert RunConfig().defences == Defences()  # off by default
    with pytest.raises(ConfigError, match="privacy = 'private': expected one of none, recommended"):
        RunConfig.from_mapping({"privacy": "private"})


# -- a deeper cut ----------------------------------------------------------------------
@pytest.mark.parametrize("stages", [1, 2])
def test_edge_stages_move_whole_stages_of_the_network_to_the_edge(stages: int) -> None:
    # Prepare
    config = RunConfig.from_mapping({"edge-stages": stages})
    edge = build_model(config.edge_model_name, 10)
    server = build_model(config.server_model_name, 10)
    whole = build_model("resnet56", 10)
    # Execute
    logits, features = edge(torch.randn(2, 3, 32, 32))
    # Assert: the features are the stage's output, the server takes them, and the
    # two parts are ResNet-56 plus the edge's own fc (width x 10 + 10)
    side = 32 // 2 ** (stages - 1)
    width = 64 * 2 ** (stages - 1)
    assert tuple(features.shape) == (2, width, side, side) and tuple(logits.shape) == (2, 10)
    assert tuple(server(features).shape) == (2, 10)
    fc = width * 10 + 10
    assert count_parameters(edge) + count_parameters(server) == count_parameters(whole) + fc
    deeper, paper = model_profile(config.edge_model_name), model_profile("resnet8")
    assert deeper["train_flops_per_sample"] > paper["train_flops_per_sample"]


def test_a_run_with_two_stages_on_the_edge_trains_on_their_features() -> None:
    # Prepare
    # Execute
    engine = _synthetic_run(1, **{"edge-stages": 2})
    # Assert
    record = engine.history[-1]
    assert record["rejected_replies"] == [] and record["eval_nodes"] == 2
    assert tuple(engine.store.node_features("0").shape[1:]) == (128, 16, 16)
    with pytest.raises(ConfigError, match="edge-stages"):
        RunConfig.from_mapping({"edge-stages": 1, "compact-features": True})


# -- the server learns from what arrives ------------------------------------------------
class _Reply:
    """What the federation screen reads of an accepted reply."""

    def __init__(self, key: str, largest: float, defences: Defences | None = None) -> None:
        self.key, self.digest, self.payload = key, "fresh", None
        self.span = PayloadRange(np.full(4, largest), 5.0)
        self.defences = defences if defences is not None else Defences()


def test_declared_noise_is_not_taken_for_an_out_of_range_node() -> None:
    # Prepare: two clean nodes whose features reach 7; a third whose clipped
    # features (clip 50) carry noise of sd 50 and reach 300, 43x their median
    screen = FederationRange()
    noisy = Defences(feature_noise=1.0, feature_clip=50.0)
    clean = [_Reply("a", 7.0), _Reply("b", 7.0)]
    # Execute
    kept, refused = screen.screen([*clean, _Reply("c", 300.0, noisy)], "train")
    _, refused_undeclared = FederationRange().screen([*clean, _Reply("c", 300.0)], "train")
    _, refused_beyond = FederationRange().screen([*clean, _Reply("c", 500.0, noisy)], "train")
    # Assert: what the declared noise explains (50 x (1 + 8 x 1) = 450) is taken;
    # the same values undeclared, or beyond the noise's reach, are refused
    assert [r.key for r in kept] == ["a", "b", "c"] and refused == []
    assert [r.key for r, _ in refused_undeclared] == ["c"]
    assert [r.key for r, _ in refused_beyond] == ["c"]


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


def test_the_server_trains_and_scores_noisy_labels_with_their_flip_probability() -> None:
    # Prepare: one node's 16 samples in one batch, its labels kept with 0.6
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(16, 6, generator=gen)
    with torch.no_grad():  # labels the model mostly predicts already (12 of 16)
        labels = _Linear()(features).argmax(1)
    labels[12:] = (labels[12:] + 1) % CLASSES
    trainer = ServerTrainer(
        model=_Linear(),
        feature_shape=(6,),
        batch_size=16,
        precision="float32",
        device="cpu",
        alpha=0.0,
        torch_threads=1,
    )
    store = FeatureStore()
    encoded = encode_features(features, "float32")
    store.put(
        "n",
        FeaturePayload(encoded, np.zeros((16, CLASSES), np.float32), labels.numpy(), np.arange(16)),
        1,
    )
    trainer.label_keep["n"] = 0.6
    with torch.no_grad():
        before = _Linear()(features)
    # Execute
    result = trainer.train(store, 1)
    # Assert: the step's cross-entropy is the corrected one on the model's logits
    # before it; scoring reports the debiased accuracy, not the agreement
    assert result.ce == pytest.approx(float(corrected_cross_entropy(before, labels, 0.6)), rel=1e-5)
    scores = trainer.evaluate(features, labels, label_keep=0.6)
    agreement = float((trainer.predict(features).argmax(1) == labels).float().mean())
    assert scores["accuracy"] == pytest.approx(debiased_accuracy(agreement, 0.6, CLASSES))
    assert scores["accuracy"] != pytest.approx(agreement)


def test_a_rounds_accuracy_under_label_dp_is_the_debiased_estimate() -> None:
    # Prepare: two synthetic nodes whose labels (test labels too) go through
    # randomized response with epsilon 1 over 10 classes
    # Execute
    engine = _synthetic_run(2, samples=40, **{"label-epsilon": 1.0})
    # Assert: the record's accuracy is, per node, the agreement of the server's
    # predictions with the noisy test labels it holds, debiased, then weighted
    keep = keep_probability(1.0, 10)
    estimates, weights = [], []
    for key in ("0", "1"):
        payload = engine.step.test_cache[key][1]
        predicted = engine.trainer.predict(decode_features(payload.features)).argmax(1)
        agreement = float((predicted == torch.from_numpy(payload.labels)).float().mean())
        estimates.append(debiased_accuracy(agreement, keep, 10))
        weights.append(payload.num_samples)
    expected = sum(e * w for e, w in zip(estimates, weights, strict=True)) / sum(weights)
    assert engine.history[-1]["accuracy"] == pytest.approx(expected)
    assert engine.history[-1]["privacy"]["label_flip"] == pytest.approx(1 - keep)
