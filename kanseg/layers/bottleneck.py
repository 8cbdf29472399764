"""Bottleneck KAN convolution: 1x1 squeeze -> basis conv -> 1x1 expand, plus a full base branch."""
from __future__ import annotations

from math import prod
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .basis import create_basis
from .conv import KANConv
from .errors import OptionError
from .factories import (conv_function, conv_module, create_activation, create_dropout,
                        create_norm, to_tuple)


def bottleneck_width(in_per_group: int, out_per_group: int, dim_reduction: float,
                     min_internal: int) -> int:
    """Inner channels per group: the larger side divided by ``dim_reduction``, floored at
    ``min_internal`` (but never wider than either side)."""
    inner = int(max(in_per_group / dim_reduction, out_per_group / dim_reduction))
    if inner < min_internal:
        inner = min(min_internal, in_per_group, out_per_group)
    return inner


class KANBottleneckConv(nn.Module):
    """``act(norm(conv(base_act(x)) + out_proj(basis_conv(inner_proj(x)))))``; the 1x1
    projections have biases with ``projection_bias=True`` (torch-conv-kan's
    ``BottleNeckGRAMLayer``)."""

    def __init__(
        self,
        family: str,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        dim_reduction: float = 4.0,
        min_internal: int = 16,
        projection_bias: bool = False,
        basis_options: dict[str, Any] | None = None,
        norm: str | None = "instance",
        activation: str | None = "silu",
        base_activation: str | None = "silu",
        dropout: float = 0.0,
        affine: bool = True,
        recompute: bool = True,
        conv_strategy: str = "heuristic",
    ):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        if dim_reduction <= 0:
            raise OptionError("dim_reduction", f"dim_reduction must be > 0, got {dim_reduction!r}")
        self.spatial_dims = spatial_dims
        self.groups = groups
        self.in_channels, self.out_channels = in_channels, out_channels
        inner = bottleneck_width(in_channels // groups, out_channels // groups, dim_reduction,
                                 min_internal)
        self.inner_channels = inner * groups
        conv_cls = conv_module(spatial_dims)
        self.inner_proj = conv_cls(in_channels, self.inner_channels, 1, groups=groups,
                                   bias=projection_bias)
        self.out_proj = conv_cls(self.inner_channels, out_channels, 1, groups=groups,
                                 bias=projection_bias)
        ks = to_tuple(kernel_size, spatial_dims, "kernel_size")
        basis = create_basis(family, inner, prod(ks), **(basis_options or {}))
        self.core = KANConv(
            basis, spatial_dims, self.inner_channels, self.inner_channels, ks, stride, padding,
            dilation, groups, norm=None, activation=None, recompute=recompute, use_base=False,
            conv_strategy=conv_strategy,
        )
        self.stride, self.padding, self.dilation = self.core.stride, self.core.padding, self.core.dilation
        self.base_activation = create_activation(base_activation, "base_activation")
        self.base_weight = nn.Parameter(torch.empty((out_channels, in_channels // groups) + ks))
        self.dropout = create_dropout(spatial_dims, dropout)
        self.norm = create_norm(norm, spatial_dims, out_channels, affine=affine)
        self.act = create_activation(activation)
        for weight in (self.base_weight, self.inner_proj.weight, self.out_proj.weight):
            nn.init.kaiming_uniform_(weight, nonlinearity="linear")

    @property
    def basis(self):
        """The basis family of the inner convolution."""
        return self.core.basis

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        conv = conv_function(self.spatial_dims)
        base = conv(self.base_activation(x), self.base_weight, None, self.stride, self.padding,
                    self.dilation, self.groups)
        y = self.out_proj(self.core(self.inner_proj(x)))
        return self.act(self.norm(y + base))
