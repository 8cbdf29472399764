"""torch-conv-kan's WavKAN layers -> ours, with the same weights (registered in
:mod:`kanseg.models.convert`).

WavKAN gives each (output o, input i) pair its own wavelet psi((x_i - t_oi) / s_oi), convolves
each output's wavelets over the inputs with a kernel K_o (``wavelet_weights``: one conv per
output, one grouped conv, or a conv of one more dimension, for the ``base``, ``fast`` and
``fast_plus_one`` versions, which compute the same thing) and mixes outputs with a 1x1 conv
W (``wavelet_out``): y_p = sum_o W_po sum_i K_oi * psi_oi(x_i). Ours is one wavelet basis with
one wavelet per output (``n_wavelets`` = output channels per group, ``translation[i, o]`` =
t_oi) and the basis weight W_po K_oi at expanded channel ``i * n + o``. The ``kans/``
``WavKANLayer`` (y_o = sum_i w_oi psi_oi(x_i)) is the same with a diagonal W and kernel 1.
WavKAN drops the wavelet branch's input only: ``dropout_placement="poly"`` here. Each WavKAN
group has its own scales and translations ``(out_g, in_g)``; as every input channel belongs
to one group, they stack along our basis' channel rows (``wavelet_groups = groups``: rows
``g * in_g + i``), so grouped layers convert whatever their groups' wavelets.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kanseg.layers import KANConv, KANLinear, create_kan_conv

from . import convert
from .torch_conv_kan import norm_state_to_ours


def _in_out(parts: list[Tensor]) -> Tensor:
    """Our ``(groups * in, out)`` wavelet parameter from WavKAN's per-group ``(1, out, in,
    1...)`` ones: group ``g``'s transposed block at rows ``g * in ..``."""
    return torch.cat([part.reshape(part.shape[1:3]).t() for part in parts])


def _wavelet_weight(wavelet_conv: nn.Module, ndim: int) -> Tensor:
    """``W_po K_oi`` of one group as our ``(out, in * out, *kernel)`` basis weight."""
    kernels = wavelet_conv.wavelet_weights
    if isinstance(kernels, nn.ModuleList):  # "base": one (1, in, *k) conv per output
        k = torch.cat([conv.weight for conv in kernels])
    else:  # "fast": (out, in, *k); "fast_plus_one": (out, 1, in, *k)
        k = kernels.weight.flatten(1, 2) if kernels.weight.dim() == ndim + 3 else kernels.weight
    mix = wavelet_conv.wavelet_out.weight.flatten(1)  # (out, out)
    weight = torch.einsum("po,oi...->pio...", mix, k)
    return weight.flatten(1, 2)


def convert_wavkan_conv(module: nn.Module) -> KANConv:
    """``WavKANConv{1,2,3}DLayer`` (every wavelet and version) -> our ``wavkan`` KANConv."""
    name = type(module).__name__
    norm, affine = convert.norm_option(module.layer_norm[0], name)
    groups, n = module.groups, module.outdim // module.groups
    ours = create_kan_conv(
        "wavkan", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **convert.conv_geometry(module), wavelet=module.wavelet_type, n_wavelets=n,
        wavelet_groups=groups, norm=norm, affine=affine,
        base_activation=convert.activation_name(module.base_activation, name),
        dropout=convert.dropout_of(module), dropout_placement="poly")
    parts = module.wavelet_conv
    state = {
        "base_weight": torch.cat([conv.weight for conv in module.base_conv]),
        "basis_weight": torch.cat([_wavelet_weight(part, module.ndim) for part in parts]),
        "basis.scale": _in_out([part.scale for part in parts]),
        "basis.translation": _in_out([part.translation for part in parts]),
        **norm_state_to_ours(module.state_dict(), groups),
    }
    ours.load_state_dict(state)
    return ours


def convert_wavkan_linear(module: nn.Module) -> KANLinear:
    """``kans`` ``WavKANLayer`` -> our ``wavkan`` KANLinear (batch norm, SiLU base branch)."""
    n_in, n_out = module.in_features, module.out_features
    ours = KANLinear("wavkan", n_in, n_out, norm="batch", wavelet=module.wavelet_type,
                     n_wavelets=n_out, base_activation="silu")
    weights = module.wavelet_weights  # (out p, in i); output p uses wavelet p only
    basis_weight = weights.unsqueeze(-1) * torch.eye(n_out, dtype=weights.dtype).unsqueeze(1)
    ours.layer.load_state_dict({
        "base_weight": module.weight1.unsqueeze(-1),
        "basis_weight": basis_weight.reshape(n_out, -1, 1),
        "basis.scale": module.scale.t(), "basis.translation": module.translation.t(),
        **{f"norm.{key}": value for key, value in module.bn.state_dict().items()},
    })
    return ours
