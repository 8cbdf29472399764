"""U2KANet: U^2-Net (nested residual U-blocks) built from KAN convs, generic over 1D/2D/3D."""
from __future__ import annotations

from functools import partial

import torch
from monai.networks.layers.factories import Conv, Pool
from torch import Tensor, nn

from .blocks import (
    ConvFactory, PlainConvFactory, RSUBlock, check_bottom_size, check_kan_levels, resize_to,
)
from .registry import register_model
from kanseg.layers.errors import OptionError

# (height, mid channels, out channels, dilated) per stage, as in U^2-Net and U^2-Net-small.
VARIANTS: dict[str, dict[str, tuple[tuple[int, int, int, bool], ...]]] = {
    "full": {
        "encoder": ((7, 32, 64, False), (6, 32, 128, False), (5, 64, 256, False),
                    (4, 128, 512, False), (4, 256, 512, True), (4, 256, 512, True)),
        "decoder": ((7, 16, 64, False), (6, 32, 64, False), (5, 64, 128, False),
                    (4, 128, 256, False), (4, 256, 512, True)),
    },
    "small": {
        "encoder": ((7, 16, 64, False), (6, 16, 64, False), (5, 16, 64, False),
                    (4, 16, 64, False), (4, 16, 64, True), (4, 16, 64, True)),
        "decoder": ((7, 16, 64, False), (6, 16, 64, False), (5, 16, 64, False),
                    (4, 16, 64, False), (4, 16, 64, True)),
    },
}


class U2KANet(nn.Module):
    """U^2-Net of RSU blocks made of KAN convs, with fused side outputs.

    Six encoder stages (max-pooled between them) and five decoder stages; every decoder stage
    and the deepest encoder stage has a 3x3 side head whose logits are upsampled to the input
    size and fused by a 1x1 conv into the prediction. With ``deep_supervision``, training-mode
    forward returns ``[fused, side_1, ..., side_6]`` (all full resolution); otherwise the fused
    logits. Any input size works (ceil-mode pooling, upsampling to the skip's size).
    ``width_scale`` multiplies every channel count of the ``variant`` ("full" or "small").
    ``kan_levels`` lists the stages (0 = full resolution .. 5 = the deepest encoder stage)
    whose RSU blocks, encoder and decoder, are KAN; the others are plain conv RSU blocks.
    ``None`` (the default) makes every stage KAN.
    ``groups``: grouped KAN convs wherever it divides both channel counts (torch-conv-kan's
    ``groups``; the stem from image channels and the heads stay ungrouped).
    ``dim_reduction``: the bottleneck convs' squeeze factor (``bottleneck_convs=True``).
    ``align_corners=True`` makes the RSU blocks upsample with aligned corners, as
    torch-conv-kan's U2KANet does (its side outputs, like ours, do not).
    ``first_kernel_size``: the kernel of the network's first conv (the first RSU block's input
    conv); with ``bottleneck_convs`` a 1x1 one is a bottleneck conv squeezing by 4, as
    torch-conv-kan's 1x1 bottleneck convs (``u2kagnet_bn_small``: 1).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        family: str = "kagn",
        variant: str = "full",
        width_scale: float = 1.0,
        norm: str = "instance",
        deep_supervision: bool = False,
        bottleneck_convs: bool = False,
        kan_levels: list[int] | None = None,
        groups: int = 1,
        dim_reduction: float = 4.0,
        align_corners: bool = False,
        first_kernel_size: int = 3,
        **family_options,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise OptionError("variant",
                              f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if width_scale <= 0:
            raise OptionError("width_scale", f"width_scale must be > 0, got {width_scale!r}")
        if (isinstance(first_kernel_size, bool) or not isinstance(first_kernel_size, int)
                or first_kernel_size < 1 or first_kernel_size % 2 == 0):
            raise OptionError("first_kernel_size", f"first_kernel_size must be a positive odd "
                                                   f"integer, got {first_kernel_size!r}")
        self.spatial_dims = spatial_dims
        self.norm = norm
        self.deep_supervision = deep_supervision
        kan = ConvFactory(family, spatial_dims, norm, bottleneck_convs, dim_reduction,
                          options=family_options, groups=groups)
        plain = PlainConvFactory(spatial_dims, norm, family_options.get("activation", "silu"))

        def scaled(spec):
            height, mid, out, dilated = spec
            mid, out = (max(1, round(c * width_scale)) for c in (mid, out))
            return height, mid, out, dilated

        enc = [scaled(s) for s in VARIANTS[variant]["encoder"]]
        dec = [scaled(s) for s in VARIANTS[variant]["decoder"]]
        levels = check_kan_levels(kan_levels, len(enc))
        conv = [kan if level in levels else plain for level in range(len(enc))]
        block = partial(RSUBlock, align_corners=align_corners)
        squeeze = (dict(bottleneck=True, dim_reduction=4.0)
                   if bottleneck_convs and first_kernel_size == 1 and conv[0] is kan else {})
        first_conv = conv[0](in_channels, enc[0][2], first_kernel_size, **squeeze)
        self.encoder = nn.ModuleList()
        channels = in_channels
        for level, (height, mid, out, dilated) in enumerate(enc):
            self.encoder.append(block(conv[level], channels, mid, out, height, dilated,
                                      conv_in=first_conv if level == 0 else None))
            channels = out
        self.decoder = nn.ModuleList()
        for level, (height, mid, out, dilated) in enumerate(dec):
            below = dec[level + 1][2] if level + 1 < len(dec) else enc[-1][2]
            self.decoder.append(block(conv[level], below + enc[level][2], mid, out, height,
                                      dilated))
        side_channels = [d[2] for d in dec] + [enc[-1][2]]
        conv_cls = Conv[Conv.CONV, spatial_dims]
        self.sides = nn.ModuleList([conv_cls(c, out_channels, 3, padding=1) for c in side_channels])
        self.fuse = conv_cls(len(side_channels) * out_channels, out_channels, 1)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"U2KANet({self.spatial_dims}D) expects input (B, C, {self.spatial_dims} spatial "
                f"dims), got shape {tuple(x.shape)}"
            )
        check_bottom_size("U2KANet", x.shape[2:], 32, self.norm)
        h, skips = x, []
        for i, stage in enumerate(self.encoder):
            h = stage(self.pool(h) if i > 0 else h)
            skips.append(h)
        decoded = [skips[-1]]
        for level in reversed(range(len(self.decoder))):
            skip = skips[level]
            h = self.decoder[level](torch.cat([resize_to(h, skip), skip], dim=1))
            decoded.insert(0, h)
        sides = [resize_to(head(d), x) for head, d in zip(self.sides, decoded)]
        fused = self.fuse(torch.cat(sides, dim=1))
        if self.training and self.deep_supervision:
            return [fused, *sides]
        return fused


register_model("u2kanet", U2KANet, dims=(1, 2, 3), variant="full",
               description="U^2-Net of KAN RSU blocks, fused side outputs (full)")
register_model("u2kanet_small", U2KANet, dims=(1, 2, 3), variant="small",
               description="U^2-Net of KAN RSU blocks, fused side outputs (small)")
