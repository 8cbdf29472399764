"""UKANet: a U-Net of residual KAN blocks, generic over 1D/2D/3D."""
from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from .blocks import (
    BLOCK_KINDS, ConvFactory, FullResRefine, PlainConvFactory, check_bottom_size,
    check_kan_levels, crop_to, pad_to_multiple, res_stage,
)
from .registry import register_model
from kanseg.layers.errors import OptionError


class UKANet(nn.Module):
    """U-Net with residual KAN blocks in encoder and decoder.

    Stage ``i`` has ``width * width_scale * 2**i`` channels; ``depth`` stride-2 stages follow the
    first one, so inputs are zero-padded to a multiple of ``stem_stride * 2**depth`` and the
    output is cropped back. With ``deep_supervision``, training-mode forward returns a list of
    logits ``[full-res, 1/2, 1/4, ...]`` (``supervision_levels`` in all); eval mode returns the
    full-resolution tensor.
    ``kan_levels`` lists the levels (0 = full resolution, ``depth`` = bottom) whose encoder and
    decoder blocks are KAN; the other levels use plain residual conv blocks with the same norm
    and activation (U-KAN's layout: KAN only at the coarse levels, where it is cheap). ``None``
    (the default) makes every level KAN; ``[]`` gives a plain residual U-Net.
    ``plain_stem`` replaces the first KAN conv by a plain conv + norm + activation (implied
    when level 0 is not in ``kan_levels``).
    ``stem_stride=2`` runs the whole U-Net at half resolution and upsamples the logits with a
    learned transposed conv: about 8x less compute in 3D (the fast setting for CPU training).
    ``refine_channels`` (with ``stem_stride=2``) replaces that transposed conv by
    :class:`~kanseg.models.blocks.FullResRefine`: upsampled features plus the input image
    through one plain full-resolution conv block of that many channels.
    ``bottleneck_convs`` uses squeeze/expand bottleneck KAN convs for every 3x3 conv.
    ``family_options`` go to every KAN conv (``degree``, ``dropout``, ``recompute``...).
    ``groups``: grouped KAN convs wherever it divides both channel counts (torch-conv-kan's
    ``groups``; the stem from image channels and the heads stay ungrouped).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        family: str = "kagn",
        depth: int = 4,
        width: int = 16,
        width_scale: float = 1.0,
        blocks_per_stage: int = 1,
        block: str = "basic",
        norm: str = "instance",
        deep_supervision: bool = False,
        supervision_levels: int = 3,
        plain_stem: bool = False,
        stem_stride: int = 1,
        bottleneck_convs: bool = False,
        kan_levels: list[int] | None = None,
        groups: int = 1,
        refine_channels: int = 0,
        **family_options,
    ):
        super().__init__()
        if depth < 1:
            raise OptionError("depth", f"depth must be >= 1, got {depth!r}")
        if block not in BLOCK_KINDS:
            raise OptionError("block", f"block must be one of {BLOCK_KINDS}, got {block!r}")
        base = round(width * width_scale)
        if base < 1:
            raise OptionError("width", f"width * width_scale must be >= 1, got {width} * "
                                       f"{width_scale}")
        if deep_supervision and not 2 <= supervision_levels <= depth:
            raise OptionError(
                "supervision_levels", f"supervision_levels must be in [2, depth = {depth}] (one "
                f"per decoder level), got {supervision_levels!r}"
            )
        if stem_stride not in (1, 2):
            raise OptionError("stem_stride", f"stem_stride must be 1 or 2, got {stem_stride!r}")
        valid = isinstance(refine_channels, int) and not isinstance(refine_channels, bool)
        if not valid or refine_channels < 0 or (refine_channels and stem_stride == 1):
            raise OptionError("refine_channels", "refine_channels must be 0 (off) or a positive "
                              "number of channels with stem_stride=2, got "
                              f"{refine_channels!r} with stem_stride={stem_stride}")
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.stem_stride = stem_stride
        self.refine = refine_channels > 0
        self.norm = norm
        self.deep_supervision = deep_supervision
        self.supervision_levels = supervision_levels if deep_supervision else 1
        channels = [base * 2**i for i in range(depth + 1)]
        levels = check_kan_levels(kan_levels, depth + 1)
        kan = ConvFactory(family, spatial_dims, norm, bottleneck_convs, options=family_options,
                          groups=groups)
        plain = PlainConvFactory(spatial_dims, norm, family_options.get("activation", "silu"))
        conv = [kan if level in levels else plain for level in range(depth + 1)]
        stem = plain if plain_stem else conv[0]
        self.stem = stem(in_channels, channels[0], 3, stride=stem_stride)
        self.encoder = nn.ModuleList(
            [res_stage(conv[i], channels[max(i - 1, 0)], channels[i], blocks_per_stage,
                       stride=1 if i == 0 else 2, kind=block) for i in range(depth + 1)]
        )
        up_conv = Conv[Conv.CONVTRANS, spatial_dims]
        self.up = nn.ModuleList(
            [up_conv(channels[i + 1], channels[i], 2, stride=2, bias=False) for i in range(depth)]
        )
        self.decoder = nn.ModuleList(
            [res_stage(conv[i], 2 * channels[i], channels[i], blocks_per_stage, kind=block)
             for i in range(depth)]
        )
        head = Conv[Conv.CONV, spatial_dims]
        self.heads = nn.ModuleList(
            [head(channels[i], out_channels, 1) for i in range(self.supervision_levels)]
        )
        if stem_stride > 1:  # the full-resolution head upsamples the half-resolution features
            self.heads[0] = (
                FullResRefine(plain, channels[0], in_channels, refine_channels, out_channels,
                              stem_stride) if refine_channels
                else up_conv(channels[0], out_channels, stem_stride, stride=stem_stride))

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"UKANet({self.spatial_dims}D) expects input (B, C, {self.spatial_dims} spatial "
                f"dims), got shape {tuple(x.shape)}"
            )
        factor = self.stem_stride * 2**self.depth
        check_bottom_size("UKANet", x.shape[2:], factor, self.norm)
        x, size = pad_to_multiple(x, factor)
        h = self.stem(x)
        skips = []
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        h = skips.pop()
        decoded: list[Tensor] = []
        for level in reversed(range(self.depth)):
            h = self.up[level](h)
            h = self.decoder[level](torch.cat([h, skips[level]], dim=1))
            decoded.append(h)
        decoded.reverse()  # decoded[level] has resolution 1 / (stem_stride * 2**level)
        head = self.heads[0]  # a FullResRefine also reads the image (its type may be wrapped)
        logits = crop_to(head(decoded[0], x) if self.refine else head(decoded[0]), size)
        if not (self.training and self.deep_supervision):
            return logits
        outputs = [logits]
        for level in range(1, self.supervision_levels):
            coarse = [-(-s // (self.stem_stride * 2**level)) for s in size]
            outputs.append(crop_to(self.heads[level](decoded[level]), coarse))
        return outputs


register_model("ukanet", UKANet, dims=(1, 2, 3),
               description="U-Net of residual KAN blocks, deep supervision optional")
