"""VGG-KAN: the VGG backbones of torch-conv-kan (VGG11/13/16/19, v2/v3/v4), any KAN family."""
from __future__ import annotations

from math import prod
from typing import Sequence

import torch
from torch import Tensor, nn

from kanseg.layers.attention import KANSelfAttention
from kanseg.layers.errors import OptionError
from kanseg.layers.moe import MOE_OPTIONS

from .blocks import ConvFactory, check_bottom_size
from .heads import HeadMixin
from .registry import register_model, renamed_options

# 3x3 convs per stage for each depth, the stage widths, and the sixth stage of each version.
_CONVS_PER_STAGE = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3),
                    19: (2, 2, 4, 4, 4)}
_STAGE_WIDTHS = (16, 32, 64, 128, 128)
_EXTRA_STAGE = {"": (), "v2": (128, 128), "v3": (128, 256), "v4": (256, 256)}


def vgg_layout(vgg_type: str) -> list[int | str]:
    """Layer list of ``vgg_type`` ("VGG11" ... "VGG19v4"): widths and "M" for 2x2 max-pools;
    the ``sa`` types (:data:`VGG_SA_TYPES`) turn the last two "M" into "SAM" (self-attention,
    then the max-pool)."""
    plain = vgg_type[:-2] if vgg_type in VGG_SA_TYPES else vgg_type
    for depth, convs in _CONVS_PER_STAGE.items():
        for version, extra in _EXTRA_STAGE.items():
            if plain != f"VGG{depth}{version}":
                continue
            stages = [[w] * n for w, n in zip(_STAGE_WIDTHS, convs)]
            if extra:
                stages.append(list(extra))
            layout: list[int | str] = []
            for stage in stages:
                layout += (["M"] if layout else []) + stage
            if plain != vgg_type:
                for index in [i for i, item in enumerate(layout) if item == "M"][-2:]:
                    layout[index] = "SAM"
            return layout
    raise OptionError("vgg_type",
                      f"vgg_type must be one of {VGG_TYPES + VGG_SA_TYPES}, got {vgg_type!r}")


VGG_TYPES = tuple(f"VGG{d}{v}" for d in _CONVS_PER_STAGE for v in _EXTRA_STAGE)
#: torch-conv-kan's self-attention VGGs
VGG_SA_TYPES = tuple(f"VGG{d}{v}sa" for d in _CONVS_PER_STAGE for v in ("", "v4"))


@renamed_options(bottleneck="bottleneck_convs")
class VGGKAN(HeadMixin, nn.Module):
    """VGG of 3x3 KAN convs (plain or bottleneck) with a classification head.

    The layer order matches torch-conv-kan's ``features`` list (index ``i`` is the ``i``-th
    entry of the layout), so its checkpoints map one to one (:mod:`.torch_conv_kan`).
    ``forward_features`` returns one feature map per stage (the map before each max-pool and
    the final one). The head pools to ``expected_feature_shape`` and applies ``head_type``, one
    of torch-conv-kan's heads (:mod:`.heads`: "Linear", "VGG", "KAN", "HiddenKAN",
    "Matryoshka", "KANtryoshka"), or None (``forward`` returns features).
    ``groups`` and the ``moe_*`` options apply to every conv but the first, as in
    torch-conv-kan (``moe_experts=8, moe_top_k=2``: its MoE VGGs; with ``bottleneck_convs=True``
    and ``moe_inner=True``: ``MoE_VGGKAGN_BN``). ``bottleneck_convs`` makes every conv a
    squeeze/expand bottleneck KAN conv (``bottleneck``: its deprecated name).
    The ``sa`` types (:data:`VGG_SA_TYPES`) put a :class:`KANSelfAttention` before the last two
    max-pools, and ``last_attention`` replaces the last conv by one (inner width
    ``channels // sa_inner_projection`` when given), as torch-conv-kan's VGGKAGN.
    The KAN layers of the KAN heads take the family options but the ``moe_*`` ones, and
    ``head_activation`` as their activation (torch-conv-kan builds them with ``"gelu"``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        family: str = "kagn",
        vgg_type: str = "VGG11",
        head_type: str | None = "Linear",
        expected_feature_shape: Sequence[int] = (7, 7),
        width_scale: int = 1,
        norm: str = "instance",
        affine: bool = True,
        bottleneck_convs: bool = False,
        dim_reduction: float = 8.0,
        groups: int = 1,
        dropout: float = 0.0,
        dropout_linear: float = 0.25,
        last_attention: bool = False,
        sa_inner_projection: int | None = None,
        head_activation: str | None = None,
        **family_options,
    ):
        super().__init__()
        layout = vgg_layout(vgg_type)
        # the attention layers are no mixtures of experts
        plain_options = {k: v for k, v in family_options.items() if k not in MOE_OPTIONS}

        def attention(channels: int) -> KANSelfAttention:
            inner = channels // sa_inner_projection if sa_inner_projection else None
            return KANSelfAttention(channels, 2, family, inner_channels=inner, norm=norm,
                                    affine=affine, groups=groups, dropout=dropout,
                                    bottleneck=bottleneck_convs, dim_reduction=dim_reduction,
                                    **plain_options)

        self.vgg_type = vgg_type
        self.family = family
        self.norm = norm
        self.expected_feature_shape = tuple(expected_feature_shape)
        conv = ConvFactory(family, 2, norm, bottleneck_convs, dim_reduction,
                           options={"affine": affine, **family_options})
        self.features = nn.ModuleList()
        self.feature_channels: list[int] = []
        channels = in_channels
        for index, item in enumerate(layout):
            if item in ("M", "SAM"):
                if item == "SAM":
                    self.features.append(attention(channels))
                self.feature_channels.append(channels)
                self.features.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            if last_attention and index == len(layout) - 1:
                self.features.append(attention(channels))
                continue
            first = not self.features
            extra = {"moe_experts": 0} if first else {"groups": groups, "dropout": dropout}
            self.features.append(conv(channels, item * width_scale, 3, **extra))
            channels = item * width_scale
        self.feature_channels.append(channels)
        self.feature_strides = [2**i for i in range(len(self.feature_channels))]
        self.avgpool = nn.AdaptiveAvgPool2d(self.expected_feature_shape)
        flat = channels * prod(self.expected_feature_shape)
        self.build_head(num_classes, head_type, flat, dropout_linear, family,
                        head_activation=head_activation, **family_options)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Feature maps at strides 1, 2, 4, ... (one per stage, the last is the deepest)."""
        check_bottom_size("VGGKAN", x.shape[2:], self.feature_strides[-1], self.norm)
        features = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                features.append(x)
            x = layer(x)
        features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)[-1]
        if self.classifier is None:
            return x
        return self.classifier(torch.flatten(self.avgpool(x), 1))


register_model("vgg_kan", VGGKAN, dims=(2,), task="classification",
               description="VGG of KAN convs (torch-conv-kan VGG11..19, v2/v3/v4)")
