"""MONAI baseline networks in the registry, so that any config trains one through the same
data pipeline, trainer, inference and evaluation as the KAN networks
(``--set model.name=segresnet``).

Each builder takes ``spatial_dims``, ``in_channels``, ``out_channels`` and ``width`` (the
channel count of the first level) and builds MONAI's own class. The network is wrapped in
:class:`PadToMultiple`, so any input size works (MONAI's U-Nets need sizes divisible by their
total stride); the wrapper adds no parameters.
"""
from __future__ import annotations

import torch
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet
from torch import Tensor, nn

from .blocks import crop_to, pad_to_multiple
from .registry import register_model
from kanseg.layers.errors import OptionError


class PadToMultiple(nn.Module):
    """Zero-pad the input's spatial dims to a multiple of ``multiple``, run ``net``, crop back."""

    def __init__(self, net: nn.Module, multiple: int):
        super().__init__()
        self.net = net
        self.multiple = multiple

    def forward(self, x: Tensor) -> Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        return crop_to(self.net(x), size)


def _check_width(width: int, multiple: int = 1) -> None:
    if width < 1 or width % multiple:
        raise OptionError("width",
                          f"width must be a positive multiple of {multiple}, got {width!r}")


def _check_depth(depth: int) -> None:
    if depth < 1:
        raise OptionError("depth", f"depth must be >= 1, got {depth!r}")


def monai_unet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
               width: int = 16, depth: int = 3, num_res_units: int = 2,
               norm: str = "instance", dropout: float = 0.0) -> nn.Module:
    """MONAI UNet: ``depth`` stride-2 levels of ``width * 2**i`` channels, residual units."""
    _check_width(width)
    _check_depth(depth)
    net = UNet(spatial_dims, in_channels, out_channels,
               channels=[width * 2**i for i in range(depth + 1)], strides=[2] * depth,
               num_res_units=num_res_units, norm=norm, dropout=dropout)
    return PadToMultiple(net, 2**depth)


def segresnet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
              width: int = 16, blocks_down: tuple[int, ...] = (1, 2, 2, 4),
              dropout: float | None = None) -> nn.Module:
    """MONAI SegResNet (Myronenko 2018) with ``init_filters = width``, group norm."""
    _check_width(width, 8)
    net = SegResNet(spatial_dims=spatial_dims, init_filters=width, in_channels=in_channels,
                    out_channels=out_channels, dropout_prob=dropout,
                    blocks_down=tuple(blocks_down), blocks_up=(1,) * (len(blocks_down) - 1))
    return PadToMultiple(net, 2 ** (len(blocks_down) - 1))


def dynunet(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
            width: int = 32, depth: int = 4, max_width: int = 320,
            res_block: bool = True) -> nn.Module:
    """MONAI DynUNet, nnU-Net style: 3x3 kernels, ``depth`` stride-2 levels,
    ``min(width * 2**i, max_width)`` channels, instance norm, leaky ReLU."""
    _check_width(width)
    _check_depth(depth)
    n = depth + 1
    net = DynUNet(spatial_dims, in_channels, out_channels, kernel_size=[3] * n,
                  strides=[1] + [2] * depth, upsample_kernel_size=[2] * depth,
                  filters=[min(width * 2**i, max_width) for i in range(n)], res_block=res_block)
    return PadToMultiple(net, 2**depth)


def swinunetr(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2,
              width: int = 24, use_checkpoint: bool = False) -> nn.Module:
    """MONAI SwinUNETR (Swin transformer encoder, CNN decoder), ``feature_size = width``."""
    _check_width(width, 12)
    with torch.device("cpu"):  # SwinUNETR calls .item() while building: no meta-device build
        net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=width,
                        spatial_dims=spatial_dims, use_checkpoint=use_checkpoint)
    return PadToMultiple(net, 32)


register_model("monai_unet", monai_unet, dims=(1, 2, 3), task="segmentation")
register_model("segresnet", segresnet, dims=(2, 3), task="segmentation")
register_model("dynunet", dynunet, dims=(1, 2, 3), task="segmentation")
register_model("swinunetr", swinunetr, dims=(2, 3), task="segmentation")

BASELINES = ("monai_unet", "segresnet", "dynunet", "swinunetr")

__all__ = ["BASELINES", "PadToMultiple", "dynunet", "monai_unet", "segresnet", "swinunetr"]
