"""Cutting a model at a named submodule into a FedGKT edge/server pair: the pieces
reproduce the model, the edge head classifies the features, and both sides train."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torchvision.models import resnet18

from flwr_fedgkt.cut import EdgeModel, ModelPair, cut_model

IMAGE = (3, 32, 32)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 5)
    )


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=10)


class _SkipAcrossCut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        a = self.fc1(x)
        return self.out(a + self.fc2(torch.relu(a)))


class _InputAcrossCut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.fc(x) + x)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_resnet18_cut_at_layer1_reproduces_the_model() -> None:
    # Prepare
    model = _resnet().eval()
    x = torch.randn(4, *IMAGE)
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, out: seen.update(layer1=out))
    # Execute
    pair = cut_model(model, "layer1", IMAGE)
    pair.edge.eval()
    pair.server.eval()
    with torch.no_grad():
        expected = model(x)
        features = pair.edge.extractor(x)
        recombined = pair.server(features)
        logits, edge_features = pair.edge(x)
    # Assert: the server keeps everything after layer1, torch.flatten included
    assert isinstance(pair, ModelPair) and isinstance(pair.edge, EdgeModel)
    assert pair.feature_shape == (64, 8, 8) and pair.num_classes == 10
    assert pair.input_shape == IMAGE
    assert_close(features, seen["layer1"])  # the features are layer1's output
    assert_close(recombined, expected)
    assert logits.shape == (4, 10) and edge_features.shape == (4, 64, 8, 8)
    assert_close(edge_features, features)
    # the default head averages over the spatial dimensions, then classifies
    linear = pair.edge.head[-1]
    assert isinstance(linear, nn.Linear) and linear.in_features == 64
    assert_close(logits, linear(features.mean(dim=(2, 3))))
    # no copies: the pieces hold the model's own parameters
    assert pair.edge.extractor.conv1.weight is model.conv1.weight
    assert pair.server.fc.weight is model.fc.weight


def test_mlp_cut_at_a_sequential_index_gets_a_linear_head() -> None:
    # Prepare
    model = _mlp().eval()
    x = torch.randn(6, 20)
    # Execute
    pair = cut_model(model, "2", (20,))
    with torch.no_grad():
        features = pair.edge.extractor(x)
        logits, _ = pair.edge(x)
        recombined = pair.server(features)
        expected = model(x)
    # Assert
    assert pair.feature_shape == (16,) and pair.num_classes == 5
    assert_close(features, model[2](model[1](model[0](x))))
    assert_close(recombined, expected)
    head = pair.edge.head
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (16, 5)
    assert_close(logits, head(features))


def test_cutting_leaves_rng_and_modes_and_seeds_the_head() -> None:
    # Prepare
    model = _mlp().train()
    given_head = nn.Linear(16, 5)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    # Execute
    cut_model(model, "2", (20,), head=given_head, num_classes=5)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    first = cut_model(model, "2", (20,)).edge.head
    torch.manual_seed(3)
    second = cut_model(model, "2", (20,)).edge.head
    # Assert
    assert torch.equal(state, after)
    assert all(m.training for m in model.modules())
    assert_close(first.weight, second.weight)
    with pytest.raises(ValueError, match="num_classes is 4"):
        cut_model(model, "2", (20,), num_classes=4)


def test_unsplittable_models_and_unknown_names_are_refused() -> None:
    # Prepare
    cases = [(_SkipAcrossCut(), "fc2"), (_InputAcrossCut(), "fc"), (_SkipAcrossCut(), "fc1")]
    # Execute / Assert: a value besides the cut module's output crosses the cut
    for model, at in cases[:2]:
        with pytest.raises(ValueError, match=f"'{at}'.*single-tensor boundary"):
            cut_model(model, at, (8,))
    cut_model(*cases[2], (8,))  # fc1's output is the only value that crosses
    with pytest.raises(ValueError, match=r"'layer9'.*\['0', '1', '2', '3', '4'\]"):
        cut_model(_mlp(), "layer9", (20,))
    with pytest.raises(ValueError, match="cannot trace") as info:
        cut_model(_DataDependent(), "fc", (8,))
    assert info.value.__cause__ is not None


def test_profile_counts_parameters_and_flops_by_hand() -> None:
    # Prepare
    model = _mlp()
    pair = cut_model(model, "2", (20,))
    extractor_params = (20 * 32 + 32) + (32 * 16 + 16)
    linear_16_5 = 16 * 5 + 5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    profile = pair.profile()
    # Assert
    edge, server = profile["edge"], profile["server"]
    assert edge["params"] == extractor_params + linear_16_5  # extractor + head
    assert server["params"] == linear_16_5  # model minus extractor
    assert server["forward_flops_per_sample"] == 2 * 16 * 5
    assert edge["forward_flops_per_sample"] == 2 * (20 * 32 + 32 * 16 + 16 * 5)
    assert server["train_flops_per_sample"] > server["forward_flops_per_sample"] > 0
    assert edge["train_flops_per_sample"] > edge["forward_flops_per_sample"]
    assert edge["feature_shape"] == server["feature_shape"] == (16,)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resnet_profile_leaves_the_model_as_it_was() -> None:
    # Prepare
    model = _resnet().eval()
    pair = cut_model(model, "layer1", IMAGE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Execute
    profile = pair.profile()
    # Assert: counting ran on copies (BatchNorm statistics and modes untouched)
    total = sum(p.numel() for p in model.parameters())
    extractor = sum(p.numel() for p in pair.edge.extractor.parameters())
    assert profile["server"]["params"] == total - extractor
    assert profile["edge"]["params"] == extractor + 64 * 10 + 10
    for part in profile.values():
        assert part["train_flops_per_sample"] > part["forward_flops_per_sample"] > 0
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_edge_and_server_train() -> None:
    # Prepare
    model = _resnet()
    pair = cut_model(model, "layer1", IMAGE)
    pair.edge.train()
    pair.server.train()
    x, y = torch.randn(4, *IMAGE), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.Adam(pair.edge.parameters(), lr=1e-2)
    conv = pair.edge.extractor.conv1.weight
    conv_before = conv.detach().clone()
    # Execute: one edge step, then the server on the detached features
    logits, features = pair.edge(x)
    F.cross_entropy(logits, y).backward()
    optimizer.step()
    shipped = features.detach()
    F.cross_entropy(pair.server(shipped), y).backward()
    # Assert
    assert not torch.equal(conv.detach(), conv_before)
    server_params = list(pair.server.parameters())
    assert server_params and all(p.grad is not None for p in server_params)
    assert pair.server.fc.weight.grad.abs().sum() > 0
    assert pair.server.get_submodule("layer2.0.conv1").weight.grad.abs().sum() > 0
    assert shipped.grad is None
