"""KAN linear layers (torch-conv-kan's ``kans``) for every family, on the one convolution core.

Features are the channels of a length-1 signal: a KAN linear layer is a 1D KAN convolution
with kernel size 1, so it shares the basis classes, the fused single matmul, the recompute and
the analytic backward of :class:`~kanseg.layers.conv.KANConv`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .basis import basis_class
from .bottleneck import KANBottleneckConv
from .builder import create_kan_conv
from .conv import KANConv
from .errors import OptionError


def _linear_norm(family: str, norm: str | None) -> str:
    """Layer norm where the family's convolution default is instance norm (which would zero a
    length-1 signal); otherwise the family's default or the caller's choice."""
    if norm is not None:
        return norm
    default = basis_class(family).layer_defaults.get("norm", "instance")
    return "layer" if default == "instance" else default


class KANLinear(nn.Module):
    """``(..., in_features) -> (..., out_features)`` through a KAN layer of ``family``.

    ``norm`` defaults to ``"layer"`` (torch-conv-kan's LayerNorm) for families whose conv
    default is instance norm; ``options`` are the family and layer options of
    :func:`kanseg.layers.create_kan_conv` (``degree``, ``base_activation``, ``dropout``,
    ``bottleneck``...). ``bias=True`` adds a learnt bias to the output (torch-conv-kan's
    ``ReLUKANLayer`` has one; so has ``FastKANLayer``'s base branch). The fastkan basis
    normalises its input across the features (``input_norm="channel_layer"``, torch-conv-kan's
    ``FastKANLayer``): per-feature normalisation over positions needs positions.
    ``bottleneck=True, projection_bias=True`` is torch-conv-kan's ``BottleNeckGRAMLayer``
    (biased squeeze and expand projections).
    """

    def __init__(self, family: str, in_features: int, out_features: int,
                 norm: str | None = None, bias: bool = False, **options):
        super().__init__()
        if family == "fastkan":
            input_norm = options.setdefault("input_norm", "channel_layer")
            if input_norm != "channel_layer":
                raise OptionError("input_norm", f"KANLinear: the fastkan basis needs "
                                  f"input_norm='channel_layer' (across features), got "
                                  f"{input_norm!r}: a linear layer has no positions to "
                                  "normalise each feature over")
        self.in_features, self.out_features = in_features, out_features
        self.layer: KANConv | KANBottleneckConv = create_kan_conv(
            family, 1, in_features, out_features, 1, norm=_linear_norm(family, norm), **options)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KANLinear expected input of shape (..., {self.in_features}), "
                             f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.layer(x.reshape(-1, self.in_features, 1)).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


class KANMLP(nn.Sequential):
    """A stack of :class:`KANLinear` layers of one family through ``widths``
    (torch-conv-kan's ``mlp_kagn`` and siblings)."""

    def __init__(self, family: str, widths: Sequence[int], **options):
        if len(widths) < 2:
            raise ValueError(f"widths needs at least an input and an output width, got {widths!r}")
        super().__init__(*(KANLinear(family, a, b, **options) for a, b in zip(widths, widths[1:])))
