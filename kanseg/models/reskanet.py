"""ResKANet: ResNet-18/34/50/101/152 layouts made of residual KAN blocks (2D backbones), and
their mixture-of-experts variants (``moe_reskanet*``)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from kanseg.layers.errors import OptionError

from .blocks import BLOCK_KINDS, ConvFactory, res_stage
from .heads import HeadMixin
from .registry import family_option_names, register_model
from .resblocks import reference_conv, reference_res_stage

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
    ``groups``; the stem, the hidden conv and the heads stay ungrouped).
    ``width_per_group``: bottleneck blocks' inner width is ``planes * width_per_group / 64``
    (torchvision's; times ``groups`` in the torch-conv-kan style).
    ``replace_stride_with_dilation``: three flags, one per stage 2-4, each replacing that
    stage's stride 2 by dilating its 3x3 convs (torchvision's rule; ``feature_strides`` follow).
    ``stem_options`` / ``pointwise_options``: KAN conv options (``family``, ``norm``,
    ``bottleneck_convs``, ``degree``...) that replace the network's for the stem / for the
    blocks' 1x1 convs and shortcuts (torch-conv-kan's ``reskagnetbn_moe_*``: KALN 1x1 convs
    with instance norm around batch-normed bottleneck KAGN mixtures).
    ``hidden_dim``: a 1x1 KAN conv (the network's options, ungrouped) from the pooled
    features to ``hidden_dim`` channels before the head (MoEResKANet's ``hidden_layer_dim``;
    not with instance norm, undefined on a 1x1 map).
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
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        stem_options: Mapping[str, Any] | None = None,
        pointwise_options: Mapping[str, Any] | None = None,
        hidden_dim: int | None = None,
        **family_options,
    ):
        super().__init__()
        _check_layout(style, block, layers, width_per_group)
        base = round(width * width_scale)
        if base < 1:
            raise OptionError("width" if width < 1 else "width_scale",
                              f"width * width_scale must be >= 1, got {width} * {width_scale}")
        conv = ConvFactory(family, 2, norm, bottleneck_convs, options=family_options,
                           groups=groups)
        channels = stem_width or base
        stem = _variant(conv, "stem_options", stem_options)
        self.stem = stem(in_channels, channels, stem_kernel_size, stride=stem_stride, groups=1,
                         moe_experts=0)
        self.pool = (nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if first_maxpool
                     else nn.Identity())
        body = (replace(conv, pointwise=_variant(conv, "pointwise_options", pointwise_options))
                if pointwise_options else conv)
        self.stages = nn.ModuleList()
        self.feature_channels = [channels]
        stride = stem_stride * (2 if first_maxpool else 1)
        self.feature_strides = [stem_stride]
        for i, (blocks, (step, first, dilation)) in enumerate(
                zip(layers, stage_geometry(replace_stride_with_dilation))):
            out = base * 2**i * EXPANSION[block]
            self.stages.append(STYLES[style](body, channels, out, blocks, step, block, dilation,
                                             first, width_per_group))
            stride *= step
            self.feature_channels.append(out)
            self.feature_strides.append(stride)
            channels = out
        self.hidden = _hidden_conv(conv, style, channels, hidden_dim)
        self.build_head(num_classes, head_type, hidden_dim or channels, dropout_linear, family,
                        **family_options)

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
        pooled = self.forward_features(x)[-1].mean(dim=(2, 3), keepdim=True)
        if self.hidden is not None:
            pooled = self.hidden(pooled)
        pooled = torch.flatten(pooled, 1)
        return pooled if self.head is None else self.head(pooled)


def _check_layout(style: str, block: str, layers: Sequence[int], width_per_group: int) -> None:
    """OptionError for a bad ``style``, ``block``, ``layers`` or ``width_per_group``."""
    if style not in STYLES:
        raise OptionError("style", f"style must be one of {tuple(STYLES)}, got {style!r}")
    if block not in BLOCK_KINDS:
        raise OptionError("block", f"block must be one of {BLOCK_KINDS}, got {block!r}")
    if len(layers) != 4:
        raise OptionError("layers", f"layers must list 4 stage depths, got {tuple(layers)!r}")
    if isinstance(width_per_group, bool) or not isinstance(width_per_group, int) \
            or width_per_group < 1:
        raise OptionError("width_per_group", f"width_per_group must be an integer >= 1, got "
                                             f"{width_per_group!r}")
    if block == "basic" and width_per_group != 64:
        raise OptionError("width_per_group", "width_per_group sets the inner width of "
                          f"bottleneck blocks; basic blocks have none (got {width_per_group})")


def stage_geometry(replace_stride_with_dilation: Sequence[bool]) -> list[tuple[int, int, int]]:
    """(stride, first block's dilation, other blocks' dilation) of the four stages: stages 2-4
    have stride 2, or stride 1 and twice the dilation when their flag is set (torchvision)."""
    flags = replace_stride_with_dilation
    if (not isinstance(flags, (list, tuple)) or len(flags) != 3
            or not all(isinstance(f, bool) for f in flags)):
        raise OptionError("replace_stride_with_dilation",
                          f"replace_stride_with_dilation must be 3 booleans (stages 2-4), got "
                          f"{replace_stride_with_dilation!r}")
    geometry, dilation = [(1, 1, 1)], 1
    for dilate in flags:
        previous, dilation = dilation, dilation * (2 if dilate else 1)
        geometry.append((1 if dilate else 2, previous, dilation))
    return geometry


def _variant(conv: ConvFactory, key: str, overrides: Mapping[str, Any] | None) -> ConvFactory:
    """``conv`` with the options ``overrides`` (the model option ``key``) replaced; each key
    must be an option of the resulting family, and so must the network's other options."""
    if not overrides:
        return conv
    if not isinstance(overrides, Mapping):
        raise OptionError(key, f"{key} must map KAN conv options to values, got {overrides!r}")
    family = overrides.get("family", conv.family)
    try:
        allowed = family_option_names(family) | {"family", "bottleneck_convs", "dim_reduction"}
    except OptionError as err:
        raise OptionError(key, f"{key}: {err}") from None
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise OptionError(key, f"{key}: {unknown} are no options of family {family!r}")
    carried = sorted(set(conv.options) - allowed)
    if carried:
        raise OptionError(key, f"{key}: family {family!r} does not take the network's "
                               f"option(s) {carried}")
    return conv.with_options(**overrides)


def _hidden_conv(conv: ConvFactory, style: str, channels: int,
                 hidden_dim: int | None) -> nn.Module | None:
    """The 1x1 KAN conv from the pooled features to ``hidden_dim`` (None: none)."""
    if hidden_dim is None:
        return None
    if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
        raise OptionError("hidden_dim", f"hidden_dim must be an integer >= 1 or null, got "
                                        f"{hidden_dim!r}")
    if conv.norm == "instance":
        raise OptionError("hidden_dim", "the hidden conv runs on the 1x1 pooled map, where "
                                        "instance norm is undefined; use another norm")
    build = reference_conv(conv) if style == "torch_conv_kan" else conv
    return build(channels, hidden_dim, 1, groups=1)


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
