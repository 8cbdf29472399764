"""``create_kan_conv``: any registered KAN family as a layer (plain or bottleneck), 1D/2D/3D."""
from __future__ import annotations

from math import prod
from typing import Sequence

from torch import nn

from .basis import basis_class, create_basis
from .bottleneck import KANBottleneckConv
from .conv import KANConv
from .moe import MOE_OPTIONS, mixture_of_experts
from .errors import OptionError
from .regularization import PENALTY_OPTIONS, attach_penalties

#: layer options every KAN family accepts, next to its basis options
LAYER_OPTIONS = ("norm", "activation", "base_activation", "dropout", "affine", "recompute",
                 "compile_expansion",
                 "conv_strategy", "dropout_placement", "dropout_type", "noise_scale",
                 *PENALTY_OPTIONS, *MOE_OPTIONS)


def create_kan_conv(
    family: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    bottleneck: bool = False,
    dim_reduction: float = 4.0,
    min_internal: int = 16,
    projection_bias: bool = False,
    **family_options,
) -> nn.Module:
    """Build a KAN convolution of any registered ``family`` in 1D, 2D or 3D.

    ``family_options`` holds the basis options (``degree``, ``grid_size``, ``wavelet``...) and
    the layer options ``norm``, ``activation``, ``base_activation``, ``dropout``, ``affine``,
    ``recompute`` and ``conv_strategy`` (deterministic ``heuristic`` by default, timed ``auto``
    opt-in, or ``grouped``/``dense``; see :mod:`kanseg.layers.strategy`). Layer options not given
    take the family's ``layer_defaults`` (torch-conv-kan's choice of base activation, output
    norm and activation), then KANConv's. ``bottleneck=True`` wraps the basis conv in 1x1
    squeeze / expand convs (biased with ``projection_bias=True``). ``dropout_placement``, ``dropout_type``, ``noise_scale`` and the
    penalties ``l1_penalty``, ``l2_penalty``, ``l1_activation_penalty`` and
    ``l2_activation_penalty`` are those of :mod:`kanseg.layers.regularization`.
    ``moe_experts`` > 0 makes a mixture of that many such convs (``moe_top_k``,
    ``moe_noisy_gating``, ``moe_loss_coef``, ``moe_inner``: see
    :func:`kanseg.layers.moe.mixture_of_experts`).
    """
    if spatial_dims not in (1, 2, 3):
        raise OptionError("spatial_dims", f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    moe = {k: family_options.pop(k) for k in MOE_OPTIONS if k in family_options}
    if moe.get("moe_experts"):
        return mixture_of_experts(create_kan_conv(
            family, spatial_dims, in_channels, out_channels, kernel_size, stride, padding,
            dilation, groups, bottleneck, dim_reduction, min_internal, projection_bias,
            **family_options), **moe)
    conv_options = dict(basis_class(family).layer_defaults)
    conv_options.update({k: family_options.pop(k) for k in LAYER_OPTIONS if k in family_options})
    penalties = {k: conv_options.pop(k) for k in PENALTY_OPTIONS if k in conv_options}
    ks = (kernel_size,) * spatial_dims if isinstance(kernel_size, int) else tuple(kernel_size)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if bottleneck:
        conv_options.pop("noise_scale", None)
        for key, default in (("dropout_placement", "full"), ("dropout_type", "dropout")):
            if conv_options.pop(key, default) != default:
                raise OptionError(key, f"bottleneck KAN convs support {key}={default!r} only")
        return attach_penalties(KANBottleneckConv(
            family, spatial_dims, in_channels, out_channels, kernel_size,
            dim_reduction=dim_reduction, min_internal=min_internal,
            projection_bias=projection_bias, basis_options=family_options, **geometry, **conv_options,
        ), **penalties)
    if projection_bias:
        raise OptionError("projection_bias", "projection_bias=True needs bottleneck=True (a "
                          "plain KAN conv has no projections)")
    if groups < 1 or in_channels % groups:
        raise OptionError("groups",
                          f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    basis = create_basis(family, in_channels // groups, prod(ks), **family_options)
    return attach_penalties(KANConv(basis, spatial_dims, in_channels, out_channels, kernel_size,
                                    **geometry, **conv_options), **penalties)
