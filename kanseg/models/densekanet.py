"""DenseKANet: torch-conv-kan's DenseNet of KAN convolutions (121/161/169/201 and tiny, plain
or bottleneck "BN" convs, or mixtures of experts "MoE BN"), any KAN family, 1D/2D/3D."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kanseg.layers import create_norm
from kanseg.layers.errors import OptionError
from kanseg.layers.factories import conv_module

from .blocks import ConvFactory, check_bottom_size
from .heads import HeadMixin
from .registry import register_model, renamed_options

#: growth rate and dense layers per block of each DenseNet depth, and of the tiny variant
DENSE_LAYOUTS = {"121": (32, (6, 12, 24, 16)), "161": (48, (6, 12, 36, 24)),
                 "169": (32, (6, 12, 32, 32)), "201": (32, (6, 12, 48, 32)),
                 "_tiny": (32, (5, 5, 5))}
#: options that make the tiny variant (5x5 stem, no max-pool, a transition after every block,
#: a KAN linear head), as torch-conv-kan's TinyDenseKANet
TINY_OPTIONS = dict(stem_kernel_size=5, first_maxpool=False, final_transition=True,
                    head_type="KAN")
#: registered suffix -> (options, description) of the plain, BN and MoE BN variants; MoE BN:
#: torch-conv-kan's ``densekagnet*moebn`` (8 experts, top 2, noisy gating, inner mixtures)
VARIANT_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "": ({}, ""),
    "_bn": (dict(bottleneck_convs=True, norm="batch"), " BN"),
    "_moebn": (dict(bottleneck_convs=True, norm="batch", moe_experts=8, moe_top_k=2,
                    moe_noisy_gating=True, moe_inner=True), " MoE BN"),
}
#: head types with KAN layers (``head_bottleneck`` applies to them)
KAN_HEAD_TYPES = ("KAN", "HiddenKAN", "KANtryoshka")
#: KAN linear options of torch-conv-kan's ``BottleNeckKAGN`` head (``head_bottleneck=True``)
BOTTLENECK_HEAD = dict(bottleneck=True, projection_bias=True, dim_reduction=8.0, min_internal=16)


class DenseLayer(nn.Module):
    """The concatenated inputs through a 1x1 KAN conv to ``bn_size * growth_rate`` channels,
    then a 3x3 KAN conv to ``growth_rate`` channels. ``memory_efficient`` recomputes the
    concatenation and the 1x1 conv in backward instead of keeping them."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, memory_efficient: bool = False):
        super().__init__()
        self.conv1, self.conv2 = conv1, conv2
        self.memory_efficient = memory_efficient

    def _bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(torch.cat(features, 1))

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled():
            return self.conv2(checkpoint(self._bottleneck, *features, use_reentrant=False))
        return self.conv2(self._bottleneck(*features))


class DenseBlock(nn.ModuleList):
    """Dense layers (modules taking the list of features so far), each fed the block input and
    all previous outputs; returns their concatenation."""

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """torch-conv-kan's transition: norm, SELU, 1x1 conv without bias, 2x average pooling."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str):
        super().__init__(create_norm(norm, spatial_dims, in_channels), nn.SELU(),
                         conv_module(spatial_dims)(in_channels, out_channels, 1, bias=False),
                         Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2))


@renamed_options(bottleneck="bottleneck_convs")
class DenseKANet(HeadMixin, nn.Module):
    """DenseNet-BC of KAN convs: a strided KAN stem (``stem_kernel_size``, stride 2), an
    optional 3x3 max-pool, dense blocks of ``block_config`` layers separated by transitions
    that halve the channels and the resolution, global average pooling and a head.

    ``bottleneck_convs=True`` makes every KAN conv a bottleneck conv (torch-conv-kan's "BN"
    variants: ``dim_reduction`` for the 3x3 convs, 4 for the stem and the 1x1 convs;
    ``bottleneck``: its deprecated name).
    ``groups`` groups the 3x3 convs (as in torch-conv-kan). The ``moe_*`` options
    (:mod:`kanseg.layers.moe`) make the dense layers' 3x3 convs sparse mixtures of experts (not
    the stem, the 1x1 convs or the head), as torch-conv-kan's MoE DenseKANets (``*_moebn``:
    bottleneck convs mixing their inner conv, ``moe_inner=True``); their load-balancing losses
    are auxiliary losses. ``head_type``: see :mod:`.heads` (``num_classes=0``: no head,
    ``forward`` returns the pooled features); ``head_bottleneck=True`` makes its KAN layers
    bottleneck KAN linear layers with biased projections squeezing by 8 (torch-conv-kan's
    ``BottleNeckKAGN`` head of its tiny BN and MoE BN DenseKANets).
    ``forward_features`` returns the map before each downsampling after the stem and the
    last map (``feature_channels``, ``feature_strides``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        family: str = "kagn",
        spatial_dims: int = 2,
        block_config: Sequence[int] = DENSE_LAYOUTS["121"][1],
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        stem_kernel_size: int = 7,
        first_maxpool: bool = True,
        final_transition: bool = False,
        norm: str = "instance",
        transition_norm: str = "batch",
        bottleneck_convs: bool = False,
        dim_reduction: float = 8.0,
        groups: int = 1,
        dropout: float = 0.0,
        dropout_linear: float = 0.0,
        head_type: str | None = "Linear",
        head_bottleneck: bool = False,
        memory_efficient: bool = False,
        **family_options: Any,
    ):
        super().__init__()
        if head_bottleneck and head_type not in KAN_HEAD_TYPES:
            raise OptionError("head_bottleneck", f"head_bottleneck=True needs a head of KAN "
                                                 f"layers {KAN_HEAD_TYPES}, got {head_type!r}")
        if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
            raise OptionError("block_config",
                              f"block_config must list positive layer counts, got {block_config!r}")
        for key, value in (("growth_rate", growth_rate), ("num_init_features", num_init_features),
                           ("bn_size", bn_size)):
            if not isinstance(value, int) or value < 1:
                raise OptionError(key, f"{key} must be a positive integer, got {value!r}")
        conv = ConvFactory(family, spatial_dims, norm, options=family_options)
        kan = {"bottleneck": bottleneck_convs, "dim_reduction": 4.0}
        self.norm = norm
        self.stem = conv(in_channels, num_init_features, stem_kernel_size, stride=2, groups=1,
                         moe_experts=0, **kan)
        self.pool = (Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
                     if first_maxpool else None)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.feature_channels: list[int] = [num_init_features] if first_maxpool else []
        self.feature_strides: list[int] = [2] if first_maxpool else []
        stride = 4 if first_maxpool else 2
        channels = num_init_features
        for i, n_layers in enumerate(block_config):
            layers = [DenseLayer(
                conv(channels + j * growth_rate, bn_size * growth_rate, 1, groups=1, **kan),
                conv(bn_size * growth_rate, growth_rate, 3, groups=groups, dropout=dropout,
                     bottleneck=bottleneck_convs, dim_reduction=dim_reduction),
                memory_efficient) for j in range(n_layers)]
            self.blocks.append(DenseBlock(layers))
            channels += n_layers * growth_rate
            self._block_stride = stride
            if i < len(block_config) - 1 or final_transition:
                self.feature_channels.append(channels)
                self.feature_strides.append(stride)
                self.transitions.append(Transition(spatial_dims, channels, channels // 2,
                                                   transition_norm))
                channels, stride = channels // 2, stride * 2
        self.feature_channels.append(channels)
        self.feature_strides.append(stride)
        self.num_features = channels
        self.build_head(num_classes, head_type, channels, dropout_linear, family,
                        **family_options, **(BOTTLENECK_HEAD if head_bottleneck else {}))

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The map before each downsampling after the stem, and the last map."""
        check_bottom_size("DenseKANet", x.shape[2:], self._block_stride, self.norm)
        x = self.stem(x)
        features = []
        if self.pool is not None:
            features.append(x)
            x = self.pool(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.transitions):
                features.append(x)
                x = self.transitions[i](x)
        features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        x = self.forward_features(x)[-1]
        pooled = torch.flatten(x.mean(dim=tuple(range(2, x.dim()))), 1)
        return pooled if self.classifier is None else self.classifier(pooled)


register_model("densekanet", DenseKANet, dims=(1, 2, 3), task="classification",
               description="DenseNet of KAN convs (torch-conv-kan DenseKANet; any layout)")
for _name, (_growth, _blocks) in DENSE_LAYOUTS.items():
    _tiny = TINY_OPTIONS if _name == "_tiny" else {}
    for _suffix, (_options, _label) in VARIANT_OPTIONS.items():
        # torch-conv-kan's tiny BN and MoE BN networks have a BottleNeckKAGN head
        _head = {"head_bottleneck": True} if _tiny and _options else {}
        register_model(f"densekanet{_name}{_suffix}", DenseKANet, dims=(1, 2, 3),
                       task="classification", growth_rate=_growth, block_config=_blocks,
                       **_tiny, **_options, **_head,
                       description=f"DenseKANet-{_name.strip('_')}{_label} "
                                   "(torch-conv-kan layout)")

__all__ = ["BOTTLENECK_HEAD", "DENSE_LAYOUTS", "KAN_HEAD_TYPES", "TINY_OPTIONS", "VARIANT_OPTIONS",
           "DenseBlock", "DenseKANet", "DenseLayer", "Transition"]
