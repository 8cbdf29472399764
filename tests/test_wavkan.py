"""WavKAN: the shannon wavelet against its formula, and torch-conv-kan's WavKAN convs, linear
layers and MLPs converted by convert_torch_conv_kan with equal eval-mode outputs."""
from __future__ import annotations

import math

import pytest
import torch
from test_models_convert import _randomise as randomise_weights
from test_models_convert import tck  # noqa: F401 - the reference fixture (skips when absent)
from torch import nn

from kanseg.layers import KANConv, KANLinear, create_basis
from kanseg.models import convert_torch_conv_kan

WAVELETS = ["mexican_hat", "morlet", "dog", "meyer", "shannon"]


def test_shannon_is_sinc_times_a_hamming_window_over_channels():
    torch.manual_seed(0)
    channels, n = 4, 3
    basis = create_basis("wavkan", channels, 9, wavelet="shannon", n_wavelets=n)
    with torch.no_grad():
        basis.scale.uniform_(0.5, 2.0)
        basis.translation.normal_()
    x = torch.randn(2, 2 * channels, 5, dtype=torch.float64)  # two groups share the basis
    x[0, 0, 0] = basis.translation[0, 0].item()  # z = 0: sinc is 1
    with torch.no_grad():
        got = basis.double()(x)
        basis.requires_grad_(False)
    for b, c, j, s in [(0, 0, 0, 0), (1, 5, 2, 3), (0, 3, 1, 4), (1, 6, 0, 1)]:
        ch = c % channels
        z = float((x[b, c, s] - basis.translation[ch, j]) / basis.scale[ch, j])
        sinc = 1.0 if z == 0 else math.sin(z) / z
        window = 0.54 - 0.46 * math.cos(2 * math.pi * ch / (channels - 1))
        assert got[b, c, j, s].item() == pytest.approx(sinc * window, rel=1e-12, abs=1e-12)


def _randomise(module: nn.Module, equal_groups: bool = True) -> None:
    """Random weights and batch-norm statistics, scales in [0.5, 1.5]; the groups' scales and
    translations equal unless told otherwise."""
    randomise_weights(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)
        parts = getattr(module, "wavelet_conv", [])
        for part in list(parts)[1:]:
            if equal_groups:
                part.scale.copy_(parts[0].scale)
                part.translation.copy_(parts[0].translation)


def _wavkan_conv(tck, dims: int, **kwargs) -> nn.Module:
    cls = getattr(tck[0], f"WavKANConv{dims}DLayer")
    return cls(4, 6, 3, padding=1, stride=2, dilation=1, **kwargs)


def _check_equal(ref: nn.Module, x: torch.Tensor, cls: type) -> nn.Module:
    ref.eval()
    ours = convert_torch_conv_kan(ref)
    assert isinstance(ours, cls) and not ours.training
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
    return ours


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_wavkan_conv_every_wavelet_converts(tck, wavelet):
    torch.manual_seed(1)
    ref = _wavkan_conv(tck, 2, wavelet_type=wavelet, groups=2, dropout=0.2)
    _randomise(ref)
    ours = _check_equal(ref, torch.randn(2, 4, 7, 7), KANConv)
    assert ours.basis.wavelet == wavelet and ours.basis.n_basis == 3  # outputs per group
    assert ours.dropout_placement == "poly" and ours.dropout.p == 0.2


@pytest.mark.parametrize("dims, version", [(1, "base"), (1, "fast"), (1, "fast_plus_one"),
                                           (2, "base"), (2, "fast_plus_one"), (3, "base"),
                                           (3, "fast")])
def test_wavkan_conv_every_version_and_dims_converts(tck, dims, version):
    torch.manual_seed(2)
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
    ref = _wavkan_conv(tck, dims, wavelet_type="shannon", wav_version=version, norm_layer=norm,
                       affine=True)
    _randomise(ref)
    _check_equal(ref, torch.randn((2, 4) + (6,) * dims), KANConv)


@pytest.mark.parametrize("dims, wavelet", [(1, "morlet"), (2, "mexican_hat"), (2, "shannon"),
                                           (3, "dog")])
def test_wavkan_conv_with_different_group_wavelets_converts(tck, dims, wavelet):
    """Each group keeps its own scales and translations (``wavelet_groups = groups``)."""
    torch.manual_seed(3)
    cls = getattr(tck[0], f"WavKANConv{dims}DLayer")
    ref = cls(6, 9, 3, padding=1, groups=3, wavelet_type=wavelet)
    _randomise(ref, equal_groups=False)
    scales = [part.scale for part in ref.wavelet_conv]
    assert not torch.equal(scales[0], scales[1])
    ours = _check_equal(ref, torch.randn((2, 6) + (5,) * dims), KANConv)
    # (groups * in_g, out_g)
    assert ours.basis.scale.shape == ours.basis.translation.shape == (6, 3)


def test_wavelet_groups_tile_the_groups_of_a_layer():
    """``wavelet_groups`` rows of parameters per channel, read cyclically by the groups; a
    count that does not divide the layer's channels is an error naming it."""
    basis = create_basis("wavkan", 2, 9, n_wavelets=3, wavelet_groups=2)
    assert basis.scale.shape == (4, 3)
    with torch.no_grad():
        basis.translation.normal_()
    x = torch.randn(1, 8, 5)  # four groups of 2 channels
    psi = basis(x)
    single = create_basis("wavkan", 2, 9, n_wavelets=3)
    with torch.no_grad():
        for g in range(4):
            single.translation.copy_(basis.translation[(g % 2) * 2:(g % 2) * 2 + 2])
            torch.testing.assert_close(psi[:, 2 * g:2 * g + 2], single(x[:, 2 * g:2 * g + 2]))
    with pytest.raises(ValueError, match="does not tile"):
        basis(torch.randn(1, 6, 5))
    with pytest.raises(ValueError, match="wavelet_groups"):
        create_basis("wavkan", 2, 9, wavelet_groups=0)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_wavkan_linear_layer_converts(tck, wavelet):
    torch.manual_seed(4)
    ref = tck[1].WavKANLayer(6, 4, wavelet_type=wavelet)
    _randomise(ref)
    _check_equal(ref, torch.randn(5, 6), KANLinear)


def test_wavkan_mlp_converts(tck):
    torch.manual_seed(5)
    ref = tck[1].WavKAN([6, 5, 3], dropout=0.1, wavelet_type="shannon")
    _randomise(ref)
    ours = _check_equal(ref, torch.randn(4, 6), nn.Sequential)
    assert [type(m) for m in ours] == [nn.Dropout, KANLinear, nn.Dropout, KANLinear]


def test_wavkan_conv_matches_in_train_mode_too(tck):
    """Batch statistics and gradients of the input agree as well (no dropout)."""
    torch.manual_seed(6)
    ref = _wavkan_conv(tck, 2, wavelet_type="morlet", groups=2)
    _randomise(ref)
    ours = convert_torch_conv_kan(ref.train())
    assert ours.training
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    y_ours, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    grads = [torch.autograd.grad(y.square().sum(), x)[0] for y in (y_ours, y_ref)]
    torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-4)
