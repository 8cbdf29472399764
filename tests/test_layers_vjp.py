"""Analytic backward of the KAN core: equal to autograd, to the slow references and to itself
under ``no_grad``, for every family with an analytic VJP."""
from __future__ import annotations

import pytest
import torch

from kanseg.layers import BASIS_REGISTRY, Basis, create_kan_conv

from test_layers import _gradcheck_layer, make, ref_layer, saved_bytes

ANALYTIC = sorted(name for name, cls in BASIS_REGISTRY.items()
                  if cls.expand_with_vjp is not Basis.expand_with_vjp)
GEOMETRY = dict(cin=4, cout=6, groups=2, kernel_size=2, stride=2, dilation=2, padding=1)


def _grads(layer, x, forward=None):
    """Output of ``forward`` (default: the layer) and the gradients of x and of every trainable
    parameter of the layer, for a fixed random cotangent."""
    x = x.detach().requires_grad_()
    y = (forward or layer)(x)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = [p for p in layer.parameters() if p.requires_grad]
    return (y, *torch.autograd.grad(y, [x, *params], cotangent))


def test_every_polynomial_family_is_analytic():
    assert set(ANALYTIC) >= {"kagn", "kaln", "kacn", "kajn", "kabn"}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("family", ANALYTIC)
def test_analytic_backward_equals_autograd_and_reference(family, dims):
    """recompute=True (analytic VJP) vs recompute=False (autograd through ``terms``) vs the slow
    per-channel reference, with groups, stride and dilation: values and all gradients."""
    layer = make(family, dims=dims, norm="none", **GEOMETRY)
    x = torch.randn((2, 4) + (6,) * dims, dtype=torch.float64)
    layer.recompute = True
    analytic = _grads(layer, x)
    layer.recompute = False
    autograd = _grads(layer, x)
    reference = _grads(layer, x, lambda inp: ref_layer(layer, inp)) if dims < 3 else autograd
    for a, b, r in zip(analytic, autograd, reference):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("family", ANALYTIC)
def test_analytic_backward_gradcheck(family):
    layer = make(family, dims=2, cin=4, cout=2, groups=2, padding=1, recompute=True)
    _gradcheck_layer(layer, torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True))


def test_legendre_ties_at_min_and_max_share_the_gradient_like_autograd():
    """KALN scales by the group min/max: repeated extreme values get autograd's even split."""
    layer = make("kaln", dims=2, norm="none", **GEOMETRY)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).round()  # many ties, also at the extremes
    layer.recompute = True
    analytic = _grads(layer, x)
    layer.recompute = False
    for a, b in zip(analytic, _grads(layer, x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ANALYTIC)
def test_frozen_basis_parameters_get_no_gradient(family):
    layer = make(family, dims=2, norm="none", **GEOMETRY)
    for p in layer.basis.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.basis_weight.grad is not None
    assert all(p.grad is None for p in layer.basis.parameters())


@pytest.mark.parametrize("family", sorted(BASIS_REGISTRY))
def test_no_grad_forward_equals_autograd_forward(family):
    """The preallocated no-grad expansion equals the autograd one (inference fast path)."""
    layer = make(family, dims=3, norm="none", **GEOMETRY)
    x = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x.requires_grad_()).detach())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("family", ANALYTIC)
def test_saved_for_backward_within_four_times_input(family, groups, dims):
    """With recompute (the default), autograd keeps <= 4x the input's bytes, also with groups."""
    layer = create_kan_conv(family, dims, 16, 16, 3, padding=1, groups=groups, norm="instance",
                            activation="silu")
    x = torch.randn((2, 16) + ({2: 32, 3: 24}[dims],) * dims, requires_grad=True)
    ratio = saved_bytes(lambda: layer(x))[1] / (x.numel() * x.element_size())
    assert ratio <= 4.0, ratio


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_constant_basis_function_folded_into_an_all_ones_convolution(dims, activation):
    """P_0 is not convolved channel by channel: its weights, summed over each group's input
    channels, convolve one all-ones image. With zero padding, stride and dilation this equals
    the convolution of the full stack (values; gradients of x, weights and beta), with and
    without autograd."""
    layer = make("kagn", dims=dims, norm="none", basis_activation=activation, **GEOMETRY)
    assert layer.basis.constant_values() == pytest.approx(
        (torch.nn.functional.__dict__[activation](torch.tensor(1.0)).item(),))
    assert layer.n_convolved == layer.n_expanded - 1

    def full_stack(inp):
        stack = torch.stack([layer.base_activation(inp), *layer.basis.terms(inp)], 2)
        return layer.act(layer.conv(stack.flatten(1, 2), layer.fused_weight(), layer.groups))

    x = torch.randn((2, 4) + (7,) * dims, dtype=torch.float64)
    for recompute in (True, False):
        layer.recompute = recompute
        for a, b in zip(_grads(layer, x), _grads(layer, x, full_stack)):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), full_stack(x))
