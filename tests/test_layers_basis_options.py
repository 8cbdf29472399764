"""Basis options added for torch-conv-kan's ``kans`` layers: the Gram basis's
``basis_activation`` (GRAMLayer's ``act``) and the Gaussian RBF basis's
``input_norm="channel_layer"`` (FastKANLayer's LayerNorm). Against explicit formulas, and
equal outputs and gradients on every path of a KAN conv (no-grad, recompute, autograd)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kanseg.layers import OptionError, create_basis, create_kan_conv


def _gram_polynomials(x: torch.Tensor, beta: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """Gram polynomials of tanh(x), written out (torch-conv-kan's ``gram_poly``)."""
    t = torch.tanh(x)
    polys = [torch.ones_like(t), t]
    for i in range(2, degree + 1):
        n, m = i - 1, i
        coeff = ((m + n) * (m - n) * n**2) / (m**2 / (4.0 * n**2 - 1.0)) * beta[n]
        polys.append(t * polys[-1] - coeff * polys[-2])
    return polys[:degree + 1]


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def _outputs_and_gradients(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients of ``x`` and of every parameter, for one backward."""
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


def _check_paths_agree(family: str, **options: object) -> None:
    """A grouped 2D conv of ``family``: the no-grad output, and the outputs and gradients with
    recompute (the basis's own backward or autograd's) and without, agree."""
    torch.manual_seed(0)
    layer = create_kan_conv(family, 2, 4, 6, 3, padding=1, groups=2, **options)
    _randomise(layer)
    plain = copy.deepcopy(layer)
    plain.recompute = False
    x = torch.randn(2, 4, 5, 5)
    recomputed = _outputs_and_gradients(layer, x)
    for got, expected in zip(recomputed, _outputs_and_gradients(plain, x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), recomputed[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_gram_basis_applies_its_activation_to_the_polynomials(activation):
    torch.manual_seed(0)
    basis = create_basis("kagn", 3, 1, degree=3, basis_activation=activation)
    _randomise(basis)
    x = torch.randn(2, 3, 7)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation]
    expected = torch.stack([act(p) for p in _gram_polynomials(x, basis.beta_weights, 3)], 2)
    # atol: the basis's tanh is 2 sigmoid(2x) - 1 (absolute error <= 2e-7), times the betas
    torch.testing.assert_close(basis(x), expected, rtol=1e-5, atol=2e-6)
    assert basis.output_activation == activation


@pytest.mark.parametrize("family, options", [
    ("kagn", dict(degree=3, basis_activation="gelu")),
    ("kagn", dict(degree=3, basis_activation="relu")),
    ("kagn", dict(degree=3, basis_activation="silu")),
    ("fastkan", dict(grid_size=4, input_norm="channel_layer")),
    ("fastkan", dict(grid_size=4, input_norm="instance")),
])
def test_basis_option_paths_agree(family, options):
    _check_paths_agree(family, **options)


@pytest.mark.parametrize("family, key, value", [("kagn", "basis_activation", "tanh"),
                                                ("fastkan", "input_norm", "layer")])
def test_unknown_basis_option_values_name_their_key(family, key, value):
    with pytest.raises(OptionError, match=f"{key} must be one of .* got '{value}'") as err:
        create_kan_conv(family, 2, 4, 4, 3, **{key: value})
    assert err.value.key == key


def test_rbf_channel_layer_norm_normalises_across_each_group():
    """``input_norm="channel_layer"``: each position's channels of one group normalised (biased
    variance), scaled and shifted per channel, then the Gaussians."""
    torch.manual_seed(0)
    basis = create_basis("fastkan", 3, 1, grid_size=5, grid_range=(-1.0, 2.0),
                         input_norm="channel_layer")
    _randomise(basis)
    x = torch.randn(2, 6, 4, 5)  # two groups of the basis's 3 channels
    grouped = x.view(2, 2, 3, 4, 5)
    mean = grouped.mean(2, keepdim=True)
    var = grouped.var(2, unbiased=False, keepdim=True)
    z = ((grouped - mean) / torch.sqrt(var + 1e-5)).view_as(x)
    z = z * basis.layer_norm.weight.repeat(2).view(1, 6, 1, 1)
    z = z + basis.layer_norm.bias.repeat(2).view(1, 6, 1, 1)
    grid = torch.linspace(-1.0, 2.0, 5).view(1, 1, 5, 1, 1)
    expected = torch.exp(-((z.unsqueeze(2) - grid) / 0.75) ** 2)
    torch.testing.assert_close(basis(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_gram_activation_analytic_backward_passes_gradcheck(activation):
    """The recompute path differentiates the activated recurrence analytically (float64)."""
    torch.manual_seed(0)
    layer = create_kan_conv("kagn", 1, 2, 3, 3, padding=1, degree=3, norm=None,
                            basis_activation=activation).double()
    _randomise(layer)
    x = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
