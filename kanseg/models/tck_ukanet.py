"""torch-conv-kan's own U-Nets (its ``models/ukanet.py``), generic over 1D/2D/3D and the KAN
family: :class:`TCKUKANet` (ResNet-style KAN blocks and merge convs) and :class:`TCKUKAGNet`
(levels of KAN convs, each decoder level optionally led by a self-attention or focal-modulation
mixer). torch-conv-kan's classes are 2D only; here ``spatial_dims`` is an argument (2 gives
theirs). Module names follow torch-conv-kan's, so its instances convert one to one
(:mod:`kanseg.models.convert_attention`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kanseg.layers.attention import KANFocalModulation, KANSelfAttention
from kanseg.layers.factories import conv_module

from .blocks import ConvFactory, check_bottom_size, crop_to, pad_to_multiple
from .registry import register_model, renamed_options
from .resblocks import reference_res_stage

MIXERS = ("conv", "self-att", "focal")


def _upsample(spatial_dims: int) -> nn.Upsample:
    """2x linear upsampling with aligned corners (torch-conv-kan's ``UpsamplingBilinear2d``)."""
    mode = ("linear", "bilinear", "trilinear")[spatial_dims - 1]
    return nn.Upsample(scale_factor=2, mode=mode, align_corners=True)


def _conv_factory(family: str, spatial_dims: int, norm: str, affine: bool,
                  bottleneck_convs: bool, dim_reduction: float, groups: int,
                  options: dict[str, Any]) -> ConvFactory:
    """KAN convs of one network; ``bottleneck_convs`` applies to every conv, 1x1 included."""
    return ConvFactory(family, spatial_dims, norm, groups=groups,
                       options={"affine": affine, "bottleneck": bottleneck_convs,
                                "dim_reduction": dim_reduction, **options})


def _check_input(model: nn.Module, x: Tensor, factor: int) -> None:
    name = type(model).__name__
    if x.dim() != model.spatial_dims + 2:
        raise ValueError(f"{name}({model.spatial_dims}D) expects input (B, C, "
                         f"{model.spatial_dims} spatial dims), got shape {tuple(x.shape)}")
    check_bottom_size(name, x.shape[2:], factor, model.norm)


@renamed_options(bottleneck="bottleneck_convs")
class TCKUKANet(nn.Module):
    """torch-conv-kan's ``UKANet`` (basic blocks): a KAN stem, four encoder stages of its
    basic blocks (:mod:`.resblocks`; ``8 * width_scale * 2**i`` channels, stride 2 from the
    second), a
    bottom stage, and three decoder levels (upsample, concatenate the skip, a 3x3 KAN ``merge``
    conv, a stage), then a 1x1 conv to ``out_channels``. Inputs are zero-padded to a multiple
    of 8 and the output cropped back. ``groups`` divides every 3x3 conv but the stem's.
    torch-conv-kan's bottleneck-block UKANets cannot run (their merge widths do not match),
    so only basic blocks are offered; ``bottleneck_convs`` makes every conv a bottleneck KAN
    conv (torch-conv-kan's ``BottleneckKAGNBasicBlock``; ``dim_reduction`` for the stem and
    merges, torch-conv-kan's choice in the blocks; ``bottleneck``: its deprecated name).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 2,
        family: str = "kagn",
        layers: Sequence[int] = (2, 2, 2, 2),
        width_scale: int = 1,
        groups: int = 1,
        stem_kernel_size: int = 3,
        norm: str = "instance",
        affine: bool = True,
        bottleneck_convs: bool = False,
        dim_reduction: float = 4.0,
        **family_options,
    ):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must list 4 stage depths >= 1, got {tuple(layers)!r}")
        self.spatial_dims, self.norm = spatial_dims, norm
        w = [8 * width_scale * 2**i for i in range(4)]
        conv = _conv_factory(family, spatial_dims, norm, affine, bottleneck_convs, dim_reduction,
                             groups, family_options)
        block_conv = ConvFactory(family, spatial_dims, norm, bottleneck_convs, groups=groups,
                                 options={"affine": affine, **family_options})

        def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
            return reference_res_stage(block_conv, in_ch, out_ch, blocks, stride, "basic")

        self.conv1 = conv(in_channels, w[0], stem_kernel_size, groups=1)
        self.layer1e = _stage(w[0], w[0], layers[0], 1)
        self.layer2e = _stage(w[0], w[1], layers[1], 2)
        self.layer3e = _stage(w[1], w[2], layers[2], 2)
        self.layer4e = _stage(w[2], w[3], layers[3], 2)
        self.layer4d = _stage(w[3], w[3], layers[3], 1)
        self.layer1d = _stage(w[0], w[0], layers[0], 1)
        self.layer2d = _stage(w[1], w[1], layers[1], 1)
        self.layer3d = _stage(w[2], w[2], layers[2], 1)
        self.merge1 = conv(w[0] + w[1], w[0], 3)
        self.merge2 = conv(w[1] + w[2], w[1], 3)
        self.merge3 = conv(w[2] + w[3], w[2], 3)
        self.output = conv_module(spatial_dims)(w[0], out_channels, 1)
        self.upsample = _upsample(spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, 8)
        x, size = pad_to_multiple(x, 8)
        enc1 = self.layer1e(self.conv1(x))
        enc2 = self.layer2e(enc1)
        enc3 = self.layer3e(enc2)
        x = self.layer4d(self.layer4e(enc3))
        for skip, merge, stage in ((enc3, self.merge3, self.layer3d),
                                   (enc2, self.merge2, self.layer2d),
                                   (enc1, self.merge1, self.layer1d)):
            x = stage(merge(torch.cat([self.upsample(x), skip], dim=1)))
        return crop_to(self.output(x), size)


@renamed_options(bottleneck="bottleneck_convs")
class TCKUKAGNet(nn.Module):
    """torch-conv-kan's ``UKAGNet``: ``depth`` encoder levels of ``layers`` 3x3 KAN convs
    (level ``i``: ``16 * width_scale * 2**i`` channels, stride 2 from level 1; the very first
    conv has no dropout), and ``depth - 1`` decoder levels: upsample (linear, aligned corners),
    concatenate the skip, an optional ``mixer`` on the concatenation (``"self-att"``:
    :class:`KANSelfAttention`, 3x3 q/k/v, ``inner_projection`` channels; ``"focal"``:
    :class:`KANFocalModulation`; ``"conv"``: none), then ``layers`` 3x3 KAN convs; a 1x1 conv
    to ``out_channels``. Inputs are zero-padded to a multiple of ``2**(depth-1)`` and the
    output cropped back. ``bottleneck_convs`` makes the convs (and the mixers' KAN convs)
    bottleneck KAN convs (``bottleneck``: its deprecated name); ``post_norm`` puts the
    network's norm after the focal modulation.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        family: str = "kagn",
        depth: int = 4,
        layers: int = 2,
        width_scale: int = 1,
        groups: int = 1,
        bottleneck_convs: bool = True,
        mixer: str = "conv",
        norm: str = "batch",
        affine: bool = True,
        dropout: float = 0.0,
        inner_projection: int | None = None,
        focal_window: int = 3,
        focal_level: int = 2,
        focal_factor: int = 2,
        post_norm: bool = True,
        normalize_modulator: bool = True,
        full_kan: bool = True,
        dim_reduction: float = 4.0,
        **family_options,
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if depth < 2 or layers < 1:
            raise ValueError(f"depth must be >= 2 and layers >= 1, got {depth!r}, {layers!r}")
        self.spatial_dims, self.norm, self.depth = spatial_dims, norm, depth
        widths = [16 * width_scale * 2**i for i in range(depth)]
        conv = _conv_factory(family, spatial_dims, norm, affine, bottleneck_convs, dim_reduction,
                             groups, family_options)
        shared = dict(spatial_dims=spatial_dims, family=family, norm=norm, affine=affine,
                      bottleneck=bottleneck_convs, dim_reduction=dim_reduction, dropout=dropout,
                      **family_options)

        def level(in_ch: int, out_ch: int, stride: int, first_dropout: float) -> list[nn.Module]:
            return [conv(in_ch, out_ch, 3, stride, dropout=first_dropout),
                    *[conv(out_ch, out_ch, 3, dropout=dropout) for _ in range(layers - 1)]]

        self.encoder = nn.ModuleList([nn.Sequential(*level(in_channels, widths[0], 1, 0.0))])
        self.encoder.extend(nn.Sequential(*level(widths[i - 1], widths[i], 2, dropout))
                            for i in range(1, depth))
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth - 1)):
            mixed = 3 * widths[i]
            mixers: list[nn.Module] = []
            if mixer == "self-att":
                mixers.append(KANSelfAttention(mixed, kernel_size=3, inner_channels=inner_projection,
                                               groups=groups, **shared))
            elif mixer == "focal":
                mixers.append(KANFocalModulation(
                    mixed, focal_window=focal_window, focal_level=focal_level,
                    focal_factor=focal_factor, post_norm=norm if post_norm else None,
                    normalize_modulator=normalize_modulator, full_kan=full_kan, **shared))
            self.decoder.append(nn.Sequential(*mixers, *level(mixed, widths[i], 1, dropout)))
        self.output = conv_module(spatial_dims)(widths[0], out_channels, 1)
        self.upsample = _upsample(spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** (self.depth - 1)
        _check_input(self, x, factor)
        x, size = pad_to_multiple(x, factor)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottom level is not a skip
        for block in self.decoder:
            x = block(torch.cat([self.upsample(x), skips.pop()], dim=1))
        return crop_to(self.output(x), size)


register_model("tck_ukanet", TCKUKANet, dims=(1, 2, 3),
               description="torch-conv-kan's UKANet: U-Net of ResNet-style KAN blocks")
register_model("tck_ukagnet", TCKUKAGNet, dims=(1, 2, 3),
               description="torch-conv-kan's UKAGNet: KAN conv U-Net, self-attention or focal "
                           "modulation mixers")

__all__ = ["MIXERS", "TCKUKAGNet", "TCKUKANet"]
