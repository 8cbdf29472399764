"""Classification heads (kanseg.models.heads): Matryoshka logits against their formula, every
head type on VGG-KAN, ResKANet and DenseKANet, and torch-conv-kan's MatryoshkaHead converted."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kanseg.layers import KANLinear, OptionError
from kanseg.models import convert_torch_conv_kan, create_model
from kanseg.models.heads import HEAD_TYPES, MatryoshkaLinear, create_head

from conftest import import_reference_models

BACKBONES = {
    "vgg_kan": dict(vgg_type="VGG11", expected_feature_shape=(1, 1), in_channels=1),
    "reskanet18": dict(width=4, in_channels=1),
    "densekanet": dict(block_config=(1, 1), growth_rate=4, num_init_features=8,
                       bn_size=2, in_channels=1),
}


def _matryoshka_formula(x: torch.Tensor, weights: list[torch.Tensor],
                        biases: list[torch.Tensor], nesting: list[int]) -> list[torch.Tensor]:
    """Logits of prefix ``n``: sum over its first ``n`` features of x[b, f] * W[k, f], plus the
    bias, written as explicit sums."""
    out = []
    for n, w, b in zip(nesting, weights, biases):
        logits = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype)
        for f in range(n):
            logits += x[:, f:f + 1] * w[:, f]
        out.append(logits + b)
    return out


@pytest.mark.parametrize("efficient", [True, False])
def test_matryoshka_logits_follow_the_formula(efficient):
    torch.manual_seed(0)
    nesting = [2, 5, 8]
    head = MatryoshkaLinear(nesting, 3, efficient=efficient)
    x = torch.randn(4, 8)
    layers = list(head.classifiers)
    if efficient:  # one weight: prefix n uses its first n columns
        weights, biases = [layers[0].weight] * 3, [layers[0].bias] * 3
        assert layers[0].weight.shape == (3, 8)
    else:
        weights, biases = [m.weight for m in layers], [m.bias for m in layers]
        assert [m.in_features for m in layers] == nesting
    got = head(x)
    assert isinstance(got, tuple) and len(got) == 3
    for logits, expected in zip(got, _matryoshka_formula(x, weights, biases, nesting)):
        torch.testing.assert_close(logits, expected)


def test_matryoshka_errors():
    with pytest.raises(ValueError, match="nesting"):
        MatryoshkaLinear([4, 4], 2)
    with pytest.raises(ValueError, match="nesting"):
        MatryoshkaLinear([], 2)
    with pytest.raises(ValueError, match="at least 8 features"):
        MatryoshkaLinear([4, 8], 2)(torch.randn(1, 6))
    with pytest.raises(ValueError, match="head_type"):
        create_head("MLP", 8, 2)
    assert create_head(None, 8, 2) is None and create_head("Linear", 8, 0) is None


@pytest.mark.parametrize("head_type", [h for h in HEAD_TYPES if h is not None])
def test_create_head_layouts(head_type):
    head = create_head(head_type, 20, 3, dropout_linear=0.1, family="kaln", degree=2)
    kan = [m for m in head.modules() if isinstance(m, KANLinear)]
    assert [m.layer.basis.family for m in kan] == ["kaln"] * ("KAN" in head_type)
    out = head.eval()(torch.randn(2, 20))
    if "tryoshka" in head_type:
        nesting = [2**n for n in (range(6, 11) if head_type == "Matryoshka" else range(5, 10))]
        assert head[-1].nesting == nesting and [o.shape for o in out] == [(2, 3)] * 5
        hidden = head[:-1](torch.randn(2, 20))
        assert hidden.shape == (2, nesting[-1])
    else:
        assert out.shape == (2, 3)


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("head_type", ["Matryoshka", "KANtryoshka"])
def test_backbones_take_matryoshka_heads(name, head_type):
    """The head sees the pooled features; its last logits equal the formula on the hidden
    features the layers before the Matryoshka layer give."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, head_type=head_type, degree=1,
                         **BACKBONES[name]).eval()
    head = model.get_classifier() if hasattr(model, "get_classifier") else (
        model.classifier if name == "vgg_kan" else model.head)
    assert isinstance(head[-1], MatryoshkaLinear)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)[-1]
        pooled = torch.flatten(features.mean(dim=(2, 3)), 1)
        hidden = head[:-1](pooled)
    layer = head[-1].classifiers[0]
    expected = _matryoshka_formula(hidden, [layer.weight] * 5, [layer.bias] * 5, head[-1].nesting)
    assert len(out) == 5
    for logits, want in zip(out, expected):
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_vgg_heads_keep_their_layout():
    model = create_model("vgg_kan", num_classes=3, dropout_linear=0.3, in_channels=1)
    assert [type(m).__name__ for m in model.classifier] == ["Dropout", "Linear"]
    assert model.classifier[0].p == 0.3
    assert create_model("vgg_kan", num_classes=0).classifier is None
    with pytest.raises(ValueError, match="head_type"):
        create_model("vgg_kan", head_type="MLP")


@pytest.mark.parametrize("name", ["reskanet18", "rdnet"])
def test_conv_dropout_and_head_dropout_are_separate_options(name):
    """``dropout`` (a KAN conv option) and ``dropout_linear`` (the head's) do not collide."""
    options = dict(width=4) if name == "reskanet18" else dict(
        num_init_features=8, growth_rates=(8,), downsample=(False,), num_blocks=(1,))
    model = create_model(name, num_classes=2, head_type="KAN", dropout=0.2, dropout_linear=0.3,
                         degree=1, **options)
    assert model.get_classifier()[0].p == 0.3
    assert model.get_classifier()[1].layer.dropout.p == 0.2


def test_densekanet_reset_keeps_the_head_type():
    model = create_model("densekanet", num_classes=3, head_type="KANtryoshka",
                         **{k: v for k, v in BACKBONES["densekanet"].items() if k != "in_channels"})
    model.reset_classifier(6)
    assert isinstance(model.get_classifier()[-1], MatryoshkaLinear)
    assert model.get_classifier()[-1].classifiers[0].out_features == 6


@pytest.mark.parametrize("efficient", [True, False])
def test_reference_matryoshka_head_converts(efficient):
    (extra_layers,) = import_reference_models("extra_layers")
    reference = extra_layers.MatryoshkaHead([4, 8, 16], 5, efficient=efficient)
    ours = convert_torch_conv_kan(reference)
    assert isinstance(ours, MatryoshkaLinear)
    x = torch.randn(3, 16)
    for a, b in zip(ours(x), reference(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, basis_activation", [("kagn", "gelu"), ("kaln", None)])
def test_head_activation_reaches_every_kan_activation(family, basis_activation):
    """``head_activation`` sets the KAN head layers' base and output activations and, for the
    Gram basis, the activation it applies to its polynomials (torch-conv-kan's GELU heads)."""
    head = create_head("HiddenKAN", 20, 3, family=family, degree=2, head_activation="gelu")
    layer = head[1].layer
    assert type(layer.base_activation) is nn.GELU and type(layer.act) is nn.GELU
    assert getattr(layer.basis, "basis_activation", None) == basis_activation
    default = create_head("HiddenKAN", 20, 3, family=family, degree=2)[1].layer
    assert type(default.act) is nn.SiLU


def test_vgg_head_activation_and_plain_kan_heads_of_moe_vggs():
    model = create_model("vgg_kan", num_classes=3, head_type="KAN", head_activation="gelu",
                         moe_experts=2, moe_top_k=1, **BACKBONES["vgg_kan"])
    head = model.get_classifier()[1]
    assert isinstance(head, KANLinear) and type(head.layer.act) is nn.GELU
    assert head.layer.basis.basis_activation == "gelu"
    assert not any("experts" in name for name, _ in head.named_modules())
    assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(OptionError, match="head_activation must be .* got 'tanh'") as err:
        create_model("vgg_kan", num_classes=3, head_type="KAN", head_activation="tanh",
                     **BACKBONES["vgg_kan"])
    assert err.value.key == "head_activation"
