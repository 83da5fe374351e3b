import pytest
import torch

from flwr_fedgkt.models import FEATURE_CHANNELS, MODEL_NAMES, build_model, count_parameters

PARAMS_10_CLASSES = {
    "resnet8": 10_586,
    "resnet55": 590_858,
    "resnet56": 591_322,
    "resnet109": 1_147_274,
    "resnet110": 1_147_738,
    # compact pair: the stem's 1x1 conv 16->3 + BatchNorm(3) add 48 + 6; the first
    # Bottleneck's 1x1 conv and shortcut conv take 3 channels instead of 16:
    # (16 - 3) x 16 + (16 - 3) x 64 = 1,040 fewer (edge and server alike)
    "resnet8-compact": 10_586 + 54 - 1_040,
    "resnet55-compact": 590_858 - 1_040,
    "resnet109-compact": 1_147_274 - 1_040,
    # edge-stages: the edge keeps the stem and the first stages, with an fc of its
    # own on their output (64 x 10 + 10 after one stage, 128 x 10 + 10 after two);
    # the server has the rest: each pair is the whole network plus that fc
    "resnet56-edge1": 28_762,
    "resnet56-server1": 591_322 + 650 - 28_762,
    "resnet56-edge2": 142_554,
    "resnet56-server2": 591_322 + 1_290 - 142_554,
    "resnet110-edge1": 56_026,
    "resnet110-server1": 1_147_738 + 650 - 56_026,
    "resnet110-edge2": 276_570,
    "resnet110-server2": 1_147_738 + 1_290 - 276_570,
}


@pytest.mark.parametrize("name, expected", sorted(PARAMS_10_CLASSES.items()))
def test_parameter_counts_match_the_architecture(name: str, expected: int) -> None:
    # Prepare / Execute
    model = build_model(name, num_classes=10)
    # Assert
    assert count_parameters(model) == expected


def test_edge_model_returns_logits_and_stem_features() -> None:
    model = build_model("resnet8", num_classes=10).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, features = model(images)
        stem_out = model.stem(images)
    assert logits.shape == (3, 10)
    assert features.shape == (3, FEATURE_CHANNELS, 32, 32)
    assert torch.equal(features, stem_out)


@pytest.mark.parametrize("name", ["resnet55", "resnet109"])
def test_server_models_take_edge_features(name: str) -> None:
    edge = build_model("resnet8", num_classes=100).eval()
    server = build_model(name, num_classes=100).eval()
    _, features = edge(torch.randn(2, 3, 32, 32))
    assert server(features).shape == (2, 100)


@pytest.mark.parametrize("name", ["resnet56", "resnet110"])
def test_full_models_take_images(name: str) -> None:
    assert build_model(name, num_classes=10).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_full_model_is_edge_stem_plus_server_model() -> None:
    full = count_parameters(build_model("resnet56"))
    server = count_parameters(build_model("resnet55"))
    stem = count_parameters(build_model("resnet8").stem)
    assert full == server + stem


def test_unknown_model_name_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet55"):
        build_model("resnet18")
    assert set(PARAMS_10_CLASSES) == set(MODEL_NAMES)
