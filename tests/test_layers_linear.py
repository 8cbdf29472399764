"""KAN linear layers: shapes and gradients for every family (parity with torch-conv-kan's
``kans`` layers: tests/test_models_convert.py)."""
from __future__ import annotations

import pytest
import torch

from kanseg.layers import BASIS_REGISTRY, KANLinear, KANMLP, OptionError


@pytest.mark.parametrize("family", sorted(BASIS_REGISTRY))
def test_every_family_maps_features_and_backpropagates(family):
    layer = KANLinear(family, 6, 4)
    x = torch.randn(3, 5, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 5, 4) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_mlp_and_bad_inputs():
    mlp = KANMLP("kagn", [8, 16, 3], degree=2)
    assert mlp(torch.randn(4, 8)).shape == (4, 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        mlp(torch.randn(4, 7))
    with pytest.raises(ValueError, match="widths"):
        KANMLP("kagn", [8])
    with pytest.raises(OptionError, match="input_norm='channel_layer'.* got 'instance'") as err:
        KANLinear("fastkan", 4, 2, input_norm="instance")
    assert err.value.key == "input_norm"
    with pytest.raises(OptionError, match="projection_bias=True needs bottleneck=True") as err:
        KANLinear("kagn", 4, 2, projection_bias=True)
    assert err.value.key == "projection_bias"


def test_bottleneck_projection_biases_are_trained():
    """``projection_bias``: the squeeze and expand projections of a bottleneck layer get
    biases (torch-conv-kan's BottleNeckGRAMLayer); the output moves with them."""
    torch.manual_seed(0)
    layer = KANLinear("kagn", 12, 8, bottleneck=True, dim_reduction=2, min_internal=4,
                      projection_bias=True, degree=2)
    inner, outer = layer.layer.inner_proj, layer.layer.out_proj
    assert inner.out_channels == 6 and inner.bias.shape == (6,) and outer.bias.shape == (8,)
    x = torch.randn(5, 12)
    layer(x).square().sum().backward()
    assert inner.bias.grad.abs().sum() > 0 and outer.bias.grad.abs().sum() > 0
    with torch.no_grad():
        before = layer(x)
        inner.bias.add_(0.5)
        assert not torch.allclose(layer(x), before)
    assert "layer.inner_proj.bias" in layer.state_dict()
