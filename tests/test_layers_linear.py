"""KAN linear layers: shapes and gradients for every family (parity with torch-conv-kan's
``kans`` layers: tests/test_models_convert.py)."""
from __future__ import annotations

import pytest
import torch

from kanseg.layers import BASIS_REGISTRY, KANLinear, KANMLP


@pytest.mark.parametrize("family", sorted(set(BASIS_REGISTRY) - {"fastkan"}))
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
    with pytest.raises(ValueError, match="fastkan"):
        KANLinear("fastkan", 4, 2)
