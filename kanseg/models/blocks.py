"""Network building blocks generic over 1D/2D/3D, all made of KAN convolutions.

Every convolution comes from :class:`ConvFactory`, which calls
:func:`kanseg.layers.create_kan_conv`: a network never writes a conv per family.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import Tensor, nn

from kanseg.layers import create_activation, create_kan_conv, create_norm
from kanseg.layers.errors import OptionError

BLOCK_KINDS = ("basic", "bottleneck")
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}
#: option names of :meth:`ConvFactory.with_options` -> the factory fields they set
_FACTORY_FIELDS = {"family": "family", "norm": "norm", "bottleneck_convs": "bottleneck",
                   "dim_reduction": "dim_reduction"}


@dataclass(frozen=True)
class ConvFactory:
    """Builds the KAN convolutions of one network: one family, norm and option set.

    ``bottleneck=True`` makes every kernel > 1 a squeeze/expand bottleneck KAN conv, and the
    ``moe_*`` options (``moe_experts=4``...) a mixture of such experts (:mod:`kanseg.layers.moe`).
    ``options`` holds the family options (``degree``...) and layer options (``dropout``...).
    ``groups`` is the default of every conv whose in and out channels it divides (so a stem
    from image channels or a head to classes stays ungrouped, as in torch-conv-kan).
    ``pointwise``: the factory of the kernel-1 convs (None: this one), for networks whose 1x1
    convs differ in family or norm (:meth:`with_options`).
    """

    family: str
    spatial_dims: int
    norm: str = "instance"
    bottleneck: bool = False
    dim_reduction: float = 4.0
    options: dict[str, Any] = field(default_factory=dict)
    groups: int = 1
    pointwise: ConvFactory | None = None

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise OptionError("groups", f"groups must be an integer >= 1, got {self.groups!r}")

    def with_options(self, **overrides: Any) -> ConvFactory:
        """This factory (without ``pointwise``) with some options replaced: ``family``,
        ``norm``, ``bottleneck_convs``, ``dim_reduction`` and any conv option."""
        fields = {name: overrides.pop(key) for key, name in _FACTORY_FIELDS.items()
                  if key in overrides}
        return replace(self, pointwise=None, options={**self.options, **overrides}, **fields)

    def for_kernel(self, kernel_size: int) -> ConvFactory:
        """The factory that builds convs of ``kernel_size``: ``pointwise`` for 1, if set."""
        return self.pointwise if kernel_size == 1 and self.pointwise is not None else self

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int | None = None, act: bool = True,
                 **overrides: Any) -> nn.Module:
        """A 'same'-padded KAN conv; ``act=False`` drops the output activation (pre-residual).

        ``overrides`` replace options for this conv only (e.g. ``dropout``).
        """
        factory = self.for_kernel(kernel_size)
        if factory is not self:
            return factory(in_channels, out_channels, kernel_size, stride, dilation, groups, act,
                           **overrides)
        if groups is None:
            divides = in_channels % self.groups == 0 and out_channels % self.groups == 0
            groups = self.groups if divides else 1
        options = {**self.options, **overrides}
        if not act:
            options["activation"] = None
        if self.bottleneck and kernel_size > 1:
            options.update(bottleneck=True, dim_reduction=self.dim_reduction)
        if kernel_size == 1:
            options.pop("moe_experts", None)
        return create_kan_conv(
            self.family, self.spatial_dims, in_channels, out_channels, kernel_size,
            stride=stride, padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
            groups=groups, norm=self.norm, **options,
        )

    def activation(self) -> nn.Module:
        """The output activation the convs use (applied after residual additions)."""
        return create_activation(self.options.get("activation", "silu"))


@dataclass(frozen=True)
class PlainConvFactory:
    """Plain conv + norm + activation with :class:`ConvFactory`'s call signature, for the
    levels of a network that are not KAN (``kan_levels``): same padding, norm and activation."""

    spatial_dims: int
    norm: str = "instance"
    activation_name: str | None = "silu"

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int = 1,
                 act: bool = True) -> nn.Module:
        """A 'same'-padded conv, norm and (unless ``act=False``) activation."""
        conv = Conv[Conv.CONV, self.spatial_dims](
            in_channels, out_channels, kernel_size, stride=stride,
            padding=dilation * (kernel_size - 1) // 2, dilation=dilation, groups=groups,
            bias=self.norm in (None, "none"))
        layers = [conv, create_norm(self.norm, self.spatial_dims, out_channels)]
        if act:
            layers.append(self.activation())
        return nn.Sequential(*layers)

    def activation(self) -> nn.Module:
        """The activation after each conv and residual addition."""
        return create_activation(self.activation_name)


def check_kan_levels(kan_levels: Sequence[int] | None, n_levels: int) -> frozenset[int]:
    """The set of levels (0 = full resolution .. ``n_levels - 1``) built from KAN convs;
    ``None`` means all of them."""
    if kan_levels is None:
        return frozenset(range(n_levels))
    levels = list(kan_levels) if isinstance(kan_levels, (list, tuple)) else [None]
    if any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n_levels
           for v in levels) or len(set(levels)) != len(levels):
        raise OptionError("kan_levels", f"kan_levels must be distinct integers in "
                          f"[0, {n_levels - 1}] (0 = full resolution) or null for all, "
                          f"got {kan_levels!r}")
    return frozenset(levels)


AnyConvFactory = Union[ConvFactory, PlainConvFactory]


class KANResBlock(nn.Module):
    """Residual KAN (or plain, with :class:`PlainConvFactory`) block: ``act(body(x) + shortcut(x))``.

    ``basic``: two 3x3 convs. ``bottleneck``: 1x1 squeeze to ``out/expansion`` (times
    ``width_per_group / 64``), 3x3, 1x1 expand. The 3x3 convs are dilated by ``dilation``.
    The shortcut is a strided 1x1 KAN conv when stride or width change.
    """

    def __init__(self, conv: AnyConvFactory, in_channels: int, out_channels: int,
                 stride: int = 1, kind: str = "basic", expansion: int = 4, dilation: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        if kind == "basic":
            self.body = nn.Sequential(conv(in_channels, out_channels, 3, stride, dilation),
                                      conv(out_channels, out_channels, 3, 1, dilation, act=False))
        elif kind == "bottleneck":
            mid = max(int(out_channels // expansion * width_per_group / 64), 1)
            self.body = nn.Sequential(conv(in_channels, mid, 1),
                                      conv(mid, mid, 3, stride, dilation),
                                      conv(mid, out_channels, 1, act=False))
        else:
            raise ValueError(f"block must be one of {BLOCK_KINDS}, got {kind!r}")
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = conv(in_channels, out_channels, 1, stride, act=False)
        self.act = conv.activation()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def stage_dilations(blocks: int, dilation: int = 1,
                    first_dilation: int | None = None) -> list[int]:
    """The dilation of each of a stage's ``blocks`` blocks: ``first_dilation`` (default
    ``dilation``) for the first, ``dilation`` for the others."""
    if blocks < 1:
        raise ValueError(f"blocks per stage must be >= 1, got {blocks!r}")
    return [first_dilation or dilation] + [dilation] * (blocks - 1)


def res_stage(conv: AnyConvFactory, in_channels: int, out_channels: int, blocks: int,
              stride: int = 1, kind: str = "basic", dilation: int = 1,
              first_dilation: int | None = None, width_per_group: int = 64) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes width / resolution and is dilated by
    ``first_dilation`` (default ``dilation``), the others by ``dilation``."""
    dilations = stage_dilations(blocks, dilation, first_dilation)
    return nn.Sequential(*(KANResBlock(conv, in_channels if i == 0 else out_channels,
                                       out_channels, stride if i == 0 else 1, kind,
                                       dilation=d, width_per_group=width_per_group)
                           for i, d in enumerate(dilations)))


class FullResRefine(nn.Module):
    """Full-resolution output of a U-Net that runs at ``1 / stride`` resolution: a transposed
    conv up to ``channels`` features, concatenated with the input image, one plain conv +
    norm + activation, and a 1x1 conv to the logits (a cheap full-resolution path that sees
    the image's own edges)."""

    def __init__(self, conv: PlainConvFactory, features: int, image_channels: int,
                 channels: int, out_channels: int, stride: int):
        super().__init__()
        dims = conv.spatial_dims
        self.up = Conv[Conv.CONVTRANS, dims](features, channels, stride, stride=stride,
                                             bias=False)
        self.block = conv(channels + image_channels, channels, 3)
        self.head = Conv[Conv.CONV, dims](channels, out_channels, 1)

    def forward(self, features: Tensor, image: Tensor) -> Tensor:
        return self.head(self.block(torch.cat([self.up(features), image], dim=1)))


def resize_to(x: Tensor, like: Tensor, align_corners: bool = False) -> Tensor:
    """Linearly interpolate ``x`` to the spatial size of ``like`` (no-op when equal)."""
    if x.shape[2:] == like.shape[2:]:
        return x
    mode = _INTERP[x.dim() - 2]
    return F.interpolate(x, size=like.shape[2:], mode=mode, align_corners=align_corners)


class RSUBlock(nn.Module):
    """U^2-Net residual U-block ``RSU-height`` made of KAN convs.

    An input conv, then a small U-Net of ``height`` levels (max-pooling between levels, a
    dilated bottom conv), decoded with skip concatenation and added to the input conv's output.
    ``dilated=True`` gives the ``RSU-4F`` form: no pooling, dilations 1, 2, 4, ... instead.
    ``align_corners=True`` upsamples in the decoder with aligned corners (torch-conv-kan's
    ``nn.UpsamplingBilinear2d``). ``conv_in``: the input conv, ``in_channels`` to
    ``out_channels`` (None: a 3x3 conv of ``conv``).
    """

    def __init__(self, conv: AnyConvFactory, in_channels: int, mid_channels: int,
                 out_channels: int, height: int, dilated: bool = False,
                 align_corners: bool = False, conv_in: nn.Module | None = None):
        super().__init__()
        if height < 2:
            raise ValueError(f"RSU height must be >= 2, got {height!r}")
        self.dilated, self.align_corners = dilated, align_corners
        dil = [2**i if dilated else 1 for i in range(height - 1)]
        self.conv_in = conv(in_channels, out_channels, 3) if conv_in is None else conv_in
        self.encoder = nn.ModuleList(
            [conv(out_channels if i == 0 else mid_channels, mid_channels, 3, dilation=d)
             for i, d in enumerate(dil)]
        )
        bottom_dilation = 2 ** (height - 1) if dilated else 2
        self.bottom = conv(mid_channels, mid_channels, 3, dilation=bottom_dilation)
        self.decoder = nn.ModuleList(
            [conv(2 * mid_channels, out_channels if i == 0 else mid_channels, 3, dilation=d)
             for i, d in enumerate(dil)][::-1]
        )
        self.pool = Pool[Pool.MAX, conv.spatial_dims](kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        x_in = self.conv_in(x)
        h, skips = x_in, []
        for i, layer in enumerate(self.encoder):
            if i > 0 and not self.dilated:
                h = self.pool(h)
            h = layer(h)
            skips.append(h)
        h = self.bottom(h)
        for layer, skip in zip(self.decoder, reversed(skips)):
            h = layer(torch.cat([resize_to(h, skip, self.align_corners), skip], dim=1))
        return h + x_in


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, ...]]:
    """Zero-pad the spatial dims of ``x`` at their end to a multiple of ``multiple``.

    Returns the padded tensor and the original spatial size (for :func:`crop_to`).
    """
    size = tuple(x.shape[2:])
    extra = [(-s) % multiple for s in size]
    if not any(extra):
        return x, size
    pad: list[int] = []
    for e in reversed(extra):
        pad += [0, e]
    return F.pad(x, pad), size


def check_bottom_size(name: str, size: Sequence[int], factor: int, norm: str) -> None:
    """Instance norm needs more than one voxel at the coarsest (``1/factor``) resolution."""
    bottom = [-(-s // factor) for s in size]
    if norm == "instance" and all(b == 1 for b in bottom):
        raise ValueError(
            f"{name}: input spatial size {tuple(size)} is too small: the coarsest level "
            f"(1/{factor}) would hold a single voxel, which instance norm cannot normalise; "
            f"use an input larger than {factor} along at least one axis"
        )


def crop_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop the spatial dims of ``x`` to ``size`` (from the start)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in size)]


__all__ = [
    "BLOCK_KINDS", "AnyConvFactory", "ConvFactory", "FullResRefine", "KANResBlock", "PlainConvFactory", "RSUBlock",
    "check_bottom_size", "check_kan_levels", "crop_to", "pad_to_multiple", "res_stage", "stage_dilations",
    "resize_to",
]
