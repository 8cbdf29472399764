"""Residual KAN blocks in torch-conv-kan's own layout (its ResKANet), generic over dims.

They differ from :class:`~.blocks.KANResBlock`: every KAN conv keeps its output activation,
nothing follows the residual addition, the basic block is a 3x3 then a 1x1 conv, and only the
3x3 conv is grouped (the bottleneck's inner width is ``groups`` times wider).
"""
from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from .blocks import BLOCK_KINDS, ConvFactory, stage_dilations

#: torch-conv-kan's bottleneck-conv squeeze factor for 1x1 and 3x3 kernels (``model_utils``)
_DIM_REDUCTION = {1: 4.0, 3: 8.0}


def reference_conv(conv: ConvFactory):
    """``conv`` with torch-conv-kan's bottleneck choice: with ``bottleneck``, 1x1 convs are
    bottleneck convs too, squeezed by :data:`_DIM_REDUCTION` (each kernel size taking its
    factory from :meth:`~.blocks.ConvFactory.for_kernel`)."""

    def build(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              groups: int = 1, dilation: int = 1) -> nn.Module:
        factory = conv.for_kernel(kernel_size)
        extra = ({"bottleneck": True, "dim_reduction": _DIM_REDUCTION[kernel_size]}
                 if factory.bottleneck else {})
        return replace(factory, bottleneck=False)(in_channels, out_channels, kernel_size,
                                                  stride, dilation, groups=groups, **extra)

    return build


class ReferenceResBlock(nn.Module):
    """``body(x) + shortcut(x)``; the shortcut is a strided 1x1 KAN conv when stride or width
    change. ``out_channels`` is ``planes`` (basic) or ``4 * planes`` (bottleneck, whose inner
    width is ``int(planes * width_per_group / 64) * groups``, torchvision's). The 3x3 conv is
    dilated by ``dilation``."""

    def __init__(self, conv: ConvFactory, in_channels: int, out_channels: int,
                 stride: int = 1, kind: str = "basic", dilation: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"block must be one of {BLOCK_KINDS}, got {kind!r}")
        groups, conv = conv.groups, reference_conv(conv)
        if kind == "basic":
            self.body = nn.Sequential(conv(in_channels, out_channels, 3, stride, groups, dilation),
                                      conv(out_channels, out_channels, 1))
        else:
            width = int(out_channels // 4 * width_per_group / 64) * groups
            self.body = nn.Sequential(conv(in_channels, width, 1),
                                      conv(width, width, 3, stride, groups, dilation),
                                      conv(width, out_channels, 1))
        self.shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                         else conv(in_channels, out_channels, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


def reference_res_stage(conv: ConvFactory, in_channels: int, out_channels: int, blocks: int,
                        stride: int = 1, kind: str = "basic", dilation: int = 1,
                        first_dilation: int | None = None,
                        width_per_group: int = 64) -> nn.Sequential:
    """``blocks`` :class:`ReferenceResBlock` s; the first changes width / resolution and is
    dilated by ``first_dilation`` (default ``dilation``), the others by ``dilation``."""
    dilations = stage_dilations(blocks, dilation, first_dilation)
    return nn.Sequential(*(ReferenceResBlock(conv, in_channels if i == 0 else out_channels,
                                             out_channels, stride if i == 0 else 1, kind, d,
                                             width_per_group)
                           for i, d in enumerate(dilations)))


__all__ = ["ReferenceResBlock", "reference_conv", "reference_res_stage"]
