"""ResKANet: ResNet-18/34/50/101/152 layouts made of residual KAN blocks (2D backbones), and
their mixture-of-experts variants (``moe_reskanet*``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from kanseg.layers.errors import OptionError
from kanseg.layers.moe import MOE_OPTIONS

from .blocks import BLOCK_KINDS, ConvFactory, res_stage
from .heads import HeadMixin
from .registry import register_model
from .resblocks import reference_res_stage

EXPANSION = {"basic": 1, "bottleneck": 4}
STYLES = {"kanseg": res_stage, "torch_conv_kan": reference_res_stage}
#: stage depths and block kind of each registered ResNet depth (``reskanet{depth}``)
RESNET_LAYOUTS: dict[int, tuple[tuple[int, ...], str]] = {
    18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"), 152: ((3, 8, 36, 3), "bottleneck")}
_DEPTHS = {layout: depth for depth, layout in RESNET_LAYOUTS.items()}


class ResKANet(HeadMixin, nn.Module):
    """ResNet of KAN convs: a 7x7 stride-2 KAN stem, 3x3 max-pool, four residual stages.

    Stage ``i`` has ``layers[i]`` blocks of width ``width * width_scale * 2**i`` (times 4 for
    bottleneck blocks). ``forward_features`` returns the maps at strides 2, 4, 8, 16, 32;
    ``forward`` global-average-pools the last and applies dropout + linear (``num_classes=0``:
    no head, ``forward`` returns the pooled features).
    ``stem_width`` (default ``width * width_scale``), ``stem_kernel_size``, ``stem_stride`` and
    ``first_maxpool`` shape the stem (torch-conv-kan's 3x3 stride-1 stems; ``feature_strides``
    follow). The ``moe_*`` options (:mod:`kanseg.layers.moe`) make every KAN conv with a kernel
    > 1 but the stem a sparse mixture of experts, as torch-conv-kan's ``MoEResKANet``
    (``moe_reskanet*``: 8 experts, top 2); their load-balancing losses are auxiliary losses.
    ``groups``: grouped KAN convs wherever it divides both channel counts (torch-conv-kan's
    ``groups``; the stem from image channels and the heads stay ungrouped).
    ``head_type``: any head of :mod:`.heads` (default "Linear": dropout + linear).
    ``style="torch_conv_kan"`` builds torch-conv-kan's own blocks (:mod:`.resblocks`; with
    ``width=8`` its ResKANet widths), which its models convert to.
    """

    head_attribute = "head"

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        family: str = "kagn",
        layers: Sequence[int] = (2, 2, 2, 2),
        block: str = "basic",
        width: int = 64,
        width_scale: float = 1.0,
        norm: str = "batch",
        dropout_linear: float = 0.0,
        bottleneck_convs: bool = False,
        groups: int = 1,
        head_type: str | None = "Linear",
        style: str = "kanseg",
        stem_width: int | None = None,
        stem_kernel_size: int = 7,
        stem_stride: int = 2,
        first_maxpool: bool = True,
        **family_options,
    ):
        super().__init__()
        if style not in STYLES:
            raise OptionError("style", f"style must be one of {tuple(STYLES)}, got {style!r}")
        if block not in BLOCK_KINDS:
            raise OptionError("block", f"block must be one of {BLOCK_KINDS}, got {block!r}")
        if len(layers) != 4:
            raise OptionError("layers", f"layers must list 4 stage depths, got {tuple(layers)!r}")
        base = round(width * width_scale)
        if base < 1:
            raise OptionError("width" if width < 1 else "width_scale",
                              f"width * width_scale must be >= 1, got {width} * {width_scale}")
        conv = ConvFactory(family, 2, norm, bottleneck_convs, options=family_options,
                           groups=groups)
        channels = stem_width or base
        self.stem = conv(in_channels, channels, stem_kernel_size, stride=stem_stride,
                         moe_experts=0)
        self.pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if first_maxpool
                     else nn.Identity())
        self.stages = nn.ModuleList()
        self.feature_channels = [channels]
        for i, blocks in enumerate(layers):
            out = base * 2**i * EXPANSION[block]
            self.stages.append(STYLES[style](conv, channels, out, blocks, 1 if i == 0 else 2,
                                             block))
            self.feature_channels.append(out)
            channels = out
        stride = stem_stride * (2 if first_maxpool else 1)
        self.feature_strides = [stem_stride] + [stride * 2**i for i in range(4)]
        self.build_head(num_classes, head_type, channels, dropout_linear, family,
                        **{k: v for k, v in family_options.items() if k not in MOE_OPTIONS})

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Feature maps of the stem and of each stage (at ``feature_strides``)."""
        x = self.stem(x)
        features = [x]
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.flatten(self.forward_features(x)[-1].mean(dim=(2, 3), keepdim=True), 1)
        return pooled if self.head is None else self.head(pooled)


def reskanet_name(layers: Sequence[int], block: str, moe: bool = False) -> str:
    """The registered name of the ResNet layout ``layers`` of ``block`` blocks
    (:data:`RESNET_LAYOUTS`; ``reskanet18`` for another layout), ``moe_reskanet*`` with
    ``moe``."""
    depth = _DEPTHS.get((tuple(layers), block), 18)
    return f"{'moe_' if moe else ''}reskanet{depth}"


for _depth, (_layers, _block) in RESNET_LAYOUTS.items():
    register_model(f"reskanet{_depth}", ResKANet, dims=(2,), task="classification",
                   layers=_layers, block=_block,
                   description=f"ResNet-{_depth} layout of residual KAN blocks ({_block})")
    register_model(f"moe_reskanet{_depth}", ResKANet, dims=(2,), task="classification",
                   layers=_layers, block=_block, moe_experts=8, moe_top_k=2,
                   description=f"ResNet-{_depth} layout of residual KAN blocks ({_block}) "
                               "whose 3x3 convs are sparse mixtures of 8 experts (top 2)")
