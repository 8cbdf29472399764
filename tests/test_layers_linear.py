"""KAN linear layers: shapes, every family, and parity with torch-conv-kan's ``kans`` layers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kanseg.layers import BASIS_REGISTRY, KANLinear, KANMLP

TCK = Path(__file__).resolve().parents[2] / "shared" / "reference" / "torch-conv-kan"


@pytest.fixture(scope="module")
def kans():
    if not (TCK / "kans" / "layers.py").exists():
        pytest.skip(f"torch-conv-kan reference not found at {TCK}")
    sys.path.insert(0, str(TCK))
    try:
        import kans.layers as layers  # noqa: PLC0415 - the reference, imported at run time
    finally:
        sys.path.remove(str(TCK))
    return layers


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


def _assert_same_outputs(ours, ref):
    x = torch.randn(5, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gram_layer_matches_torch_conv_kan(kans):
    torch.manual_seed(0)
    ref = kans.GRAMLayer(6, 4, degree=3)
    with torch.no_grad():
        ref.beta_weights.normal_()
        ref.norm.weight.uniform_(0.5, 1.5)
        ref.norm.bias.normal_()
    ours = KANLinear("kagn", 6, 4, degree=3)
    layer = ours.layer
    with torch.no_grad():
        layer.basis.beta_weights.copy_(ref.beta_weights)
        layer.base_weight.copy_(ref.base_weights.unsqueeze(-1))
        # theirs: (in, out, degree + 1); ours: (out, in * (degree + 1)), channel-major
        layer.basis_weight.copy_(ref.grams_basis_weights.permute(1, 0, 2).reshape(4, 24, 1))
        layer.norm.weight.copy_(ref.norm.weight)
        layer.norm.bias.copy_(ref.norm.bias)
    _assert_same_outputs(ours, ref)


def test_legendre_layer_matches_torch_conv_kan(kans):
    ref = kans.KALNLayer(6, 4, degree=3)
    ours = KANLinear("kaln", 6, 4, degree=3, base_activation="silu")
    with torch.no_grad():  # theirs is already (out, in * (degree + 1)), channel-major
        ours.layer.base_weight.copy_(ref.base_weight.unsqueeze(-1))
        ours.layer.basis_weight.copy_(ref.poly_weight.unsqueeze(-1))
    _assert_same_outputs(ours, ref)


def test_chebyshev_layer_matches_torch_conv_kan(kans):
    ref = kans.ChebyKANLayer(6, 4, degree=3)
    ours = KANLinear("kacn", 6, 4, degree=3, norm="none")
    with torch.no_grad():
        ours.layer.basis_weight.copy_(ref.cheby_coeffs.permute(1, 0, 2).reshape(4, 24, 1))
    _assert_same_outputs(ours, ref)
