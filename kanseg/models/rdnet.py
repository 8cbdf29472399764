"""KAGN RDNet: torch-conv-kan's ``kan_rdnet`` (RDNet, NAVER's revived DenseNet, with KAN
convolutions), any KAN family, 1D/2D/3D.

A patchify stem, stages of dense blocks (depthwise 7x7 KAN conv, two 1x1 KAN convs, optional
effective squeeze-excitation, layer scale; outputs concatenated), 1x1 or strided 2x2 KAN
transitions that compress the channels, optionally a self-KAN-attention after each stage
(torch-conv-kan's ``post_block_attention``), and a LayerNorm + linear head. Every KAN conv is
followed by a LayerNorm over its channels (timm's ``LayerNorm2d``) and SiLU.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from math import prod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from kanseg.layers import LAYER_OPTIONS, create_activation, create_basis, create_kan_conv
from kanseg.layers.attention import KANSelfAttention
from kanseg.layers.errors import OptionError, UnknownOptionError
from kanseg.layers.factories import conv_function, create_dropout, to_tuple

from .densekanet import DenseBlock
from .heads import HeadMixin
from .registry import family_option_names, register_model, renamed_options

#: torch-conv-kan's kagrdnet variants: stem width, growth rates, downsampling and ESE per stage
RDNET_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_init_features=32, growth_rates=(32, 52, 64, 64, 64, 64, 112),
                 downsample=(False, True, True, False, False, False, True),
                 ese=(False, False) + (True,) * 5),
    "small": dict(num_init_features=72, growth_rates=(64, 128) + (128,) * 7 + (240,) * 2,
                  downsample=(False, True, True) + (False,) * 6 + (True, False),
                  ese=(False, False) + (True,) * 9),
    "base": dict(num_init_features=120, growth_rates=(96, 128) + (168,) * 7 + (336,) * 2,
                 downsample=(False, True, True) + (False,) * 6 + (True, False),
                 ese=(False, False) + (True,) * 9),
    "large": dict(num_init_features=144, growth_rates=(128, 192) + (256,) * 8 + (360,) * 2,
                  downsample=(False, True, True) + (False,) * 7 + (True, False),
                  ese=(False, False) + (True,) * 10),
}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels at each position of ``(B, C, *S)`` (timm's LayerNorm2d)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DegreeMajorDepthwiseConv(nn.Module):
    """torch-conv-kan's depthwise ``KAGNConvNDLayerV2`` layout: ``conv(base_act(x))`` per
    channel plus a conv with ``C`` groups over the basis stacked degree-major (channel
    ``d * C + c``), so output channel ``g`` reads stacked channels ``g * n .. g * n + n - 1``
    (neighbouring input channels, not channel ``g``). Kept only so its RDNet weights load;
    :class:`RDNet` uses a plain depthwise :class:`~kanseg.layers.KANConv` otherwise."""

    def __init__(self, family: str, spatial_dims: int, channels: int, kernel_size: int,
                 padding: int, dropout: float = 0.0, **basis_options: Any):
        super().__init__()
        ks = to_tuple(kernel_size, spatial_dims, "kernel_size")
        self.spatial_dims, self.channels, self.padding = spatial_dims, channels, padding
        self.basis = create_basis(family, channels, prod(ks), **basis_options)
        self.base_activation = nn.SiLU()
        self.dropout = create_dropout(spatial_dims, dropout)
        self.base_weight = nn.Parameter(torch.empty((channels, 1) + ks))
        self.basis_weight = nn.Parameter(torch.empty((channels, self.basis.n_basis) + ks))
        for weight in (self.base_weight, self.basis_weight):
            nn.init.kaiming_uniform_(weight, nonlinearity="linear")

    def forward(self, x: Tensor) -> Tensor:
        conv = conv_function(self.spatial_dims)
        base = conv(self.base_activation(x), self.base_weight, None, 1, self.padding, 1,
                    self.channels)
        if self.dropout is not None:
            x = self.dropout(x)
        stack = self.basis(x).transpose(1, 2).flatten(1, 2)
        return base + conv(stack, self.basis_weight, None, 1, self.padding, 1, self.channels)


@dataclass(frozen=True)
class _KANUnits:
    """Builds KAN conv + channel LayerNorm + activation units of one RDNet."""

    family: str
    spatial_dims: int
    bottleneck: bool
    activation: str | None
    options: dict[str, Any] = field(default_factory=dict)

    def with_options(self, overrides: Mapping[str, Any] | None, key: str) -> _KANUnits:
        """These units with the options ``overrides`` (the model option ``key``) replaced:
        ``bottleneck_convs`` and the family's options."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise OptionError(key, f"{key} must map KAN conv options to values, got "
                                   f"{overrides!r}")
        options = dict(overrides)
        unknown = sorted(set(options) - family_option_names(self.family) - {"bottleneck_convs"})
        if unknown:
            raise OptionError(key, f"{key}: {unknown} are no options of family {self.family!r}")
        bottleneck = bool(options.pop("bottleneck_convs", self.bottleneck))
        return replace(self, bottleneck=bottleneck, options={**self.options, **options})

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: int = 0) -> nn.Sequential:
        conv = create_kan_conv(self.family, self.spatial_dims, in_channels, out_channels,
                               kernel_size, stride=stride, padding=padding, norm="none",
                               activation=None, bottleneck=self.bottleneck, **self.options)
        return self.finish(conv, out_channels)

    def depthwise(self, channels: int, reference_layout: bool) -> nn.Sequential:
        """The 7x7 depthwise KAN conv of a block (never a bottleneck conv)."""
        if reference_layout:
            basis_options = {k: v for k, v in self.options.items() if k not in LAYER_OPTIONS}
            conv: nn.Module = DegreeMajorDepthwiseConv(
                self.family, self.spatial_dims, channels, 7, 3,
                dropout=self.options.get("dropout", 0.0), **basis_options)
        else:
            conv = create_kan_conv(self.family, self.spatial_dims, channels, channels, 7,
                                   padding=3, groups=channels, norm="none", activation=None,
                                   **self.options)
        return self.finish(conv, channels)

    def finish(self, conv: nn.Module, channels: int) -> nn.Sequential:
        return nn.Sequential(conv, ChannelLayerNorm(channels), create_activation(self.activation))

    def attention(self, channels: int, inner_scale: float) -> KANSelfAttention:
        """torch-conv-kan's post-block attention: 1x1 projections to ``channels / inner_scale``
        (rounded down), 3x3 units as q, k and v, a channel LayerNorm after the residual."""
        inner = int(channels / inner_scale) if inner_scale > 0 else 0
        if inner < 1:
            raise OptionError("attention_inner_scale", f"attention_inner_scale={inner_scale!r} "
                              f"must be > 0 and leave an inner channel of the {channels}")
        return KANSelfAttention(
            channels, self.spatial_dims, self.family, inner_channels=inner,
            norm="channel_layer", recompute=self.options.get("recompute", True),
            qkv=lambda width: self(width, width, 3, padding=1))


class EffectiveSE(nn.Module):
    """Effective squeeze-excitation: ``x * hardsigmoid(fc(mean(x)))`` with a KAN unit ``fc``."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc(x.mean(dim=tuple(range(2, x.dim())), keepdim=True)))


class RDNetBlock(nn.Module):
    """Depthwise 7x7 unit, 1x1 unit to the inner width, 1x1 unit to ``growth_rate`` (and
    :class:`EffectiveSE`), scaled per channel by ``gamma`` (layer scale)."""

    def __init__(self, units: _KANUnits, in_channels: int, growth_rate: int, width_ratio: float,
                 ese: bool, ls_init_value: float, reference_layout: bool):
        super().__init__()
        inner = int(in_channels * width_ratio / 8) * 8
        layers = [units.depthwise(in_channels, reference_layout), units(in_channels, inner),
                  units(inner, growth_rate)]
        if ese:
            layers.append(EffectiveSE(units(growth_rate, growth_rate)))
        self.layers = nn.Sequential(*layers)
        self.gamma = (nn.Parameter(torch.full((growth_rate,), float(ls_init_value)))
                      if ls_init_value > 0 else None)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.layers(torch.cat(features, 1))
        if self.gamma is None:
            return x
        return x * self.gamma.view((1, -1) + (1,) * (x.dim() - 2))


@renamed_options(bottleneck="bottleneck_convs")
class RDNet(HeadMixin, nn.Module):
    """RDNet of KAN convs (torch-conv-kan's ``KAGNRDNet``; see the module docstring).

    Stage ``i`` has ``num_blocks[i]`` blocks adding ``growth_rates[i]`` channels each; every
    stage but the first starts with a KAN transition to ``transition_compression_ratio`` of
    the channels (rounded down to a multiple of 8), a strided 2x2 one where ``downsample[i]``.
    ``ese[i]`` adds effective squeeze-excitation to the blocks of stage ``i``.
    ``post_block_attention`` ends every stage with a :class:`KANSelfAttention` whose q, k and v
    are 3x3 KAN units and whose inner width is the stage's channels divided by
    ``attention_inner_scale`` (torch-conv-kan's ``inner_projection_attention_scale``).
    ``bottleneck_convs`` (the default, as torch-conv-kan's ``is_bottleneck``; ``bottleneck``:
    its deprecated name) makes every KAN conv but the depthwise ones a bottleneck conv.
    ``reference_depthwise=True`` uses torch-conv-kan's degree-major depthwise layout
    (:class:`DegreeMajorDepthwiseConv`, what its checkpoints convert to).
    ``stem_options``: KAN conv options (``bottleneck_convs``, ``degree``, ``dropout``...) that
    replace the network's for the stem (torch-conv-kan's stem is a degree-3 bottleneck KAGN
    conv without dropout whatever the body).
    ``forward_features`` returns the map before each downsampling transition and the last.
    The pooled features go through a LayerNorm, then the head ``head_type`` (:mod:`.heads`).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        family: str = "kagn",
        spatial_dims: int = 2,
        num_init_features: int = 64,
        growth_rates: Sequence[int] = (64, 104, 128, 128, 128, 128, 224),
        num_blocks: Sequence[int] | None = None,
        downsample: Sequence[bool] = (False, True, True, False, False, False, True),
        ese: Sequence[bool] | None = None,
        bottleneck_width_ratio: float = 4.0,
        transition_compression_ratio: float = 0.5,
        patch_size: int = 4,
        ls_init_value: float = 1e-6,
        bottleneck_convs: bool = True,
        activation: str | None = "silu",
        dropout_linear: float = 0.0,
        head_type: str | None = "Linear",
        reference_depthwise: bool = False,
        post_block_attention: bool = False,
        attention_inner_scale: float = 1.0,
        stem_options: Mapping[str, Any] | None = None,
        **family_options: Any,
    ):
        super().__init__()
        n_stages = len(growth_rates)
        num_blocks = tuple(num_blocks) if num_blocks is not None else (3,) * n_stages
        ese = tuple(ese) if ese is not None else (False,) * n_stages
        for key, value in (("num_blocks", num_blocks), ("downsample", downsample), ("ese", ese)):
            if len(value) != n_stages:
                raise OptionError(key, f"{key} must have one entry per stage ({n_stages}, as "
                                  f"growth_rates), got {tuple(value)!r}")
        if downsample[0]:
            raise OptionError("downsample",
                              "downsample[0] must be false: the first stage follows the stem")
        if "norm" in family_options:
            raise UnknownOptionError(
                "norm", "RDNet normalises every KAN conv with a channel LayerNorm; "
                f"norm={family_options['norm']!r} is not an option")
        self.downsample = tuple(bool(d) for d in downsample)
        units = _KANUnits(family, spatial_dims, bottleneck_convs, activation, family_options)
        self.stem = units.with_options(stem_options, "stem_options")(
            in_channels, num_init_features, patch_size, stride=patch_size)
        self.stages = nn.ModuleList()
        self.feature_channels: list[int] = []
        self.feature_strides: list[int] = []
        channels, stride = num_init_features, patch_size
        for i in range(n_stages):
            parts: list[nn.Module] = []
            if i > 0:
                if downsample[i]:
                    self.feature_channels.append(channels)
                    self.feature_strides.append(stride)
                    stride *= 2
                compressed = int(channels * transition_compression_ratio / 8) * 8
                k = 2 if downsample[i] else 1
                parts.append(units(channels, compressed, k, stride=k))
                channels = compressed
            parts.append(DenseBlock(
                RDNetBlock(units, channels + j * growth_rates[i], growth_rates[i],
                           bottleneck_width_ratio, ese[i], ls_init_value, reference_depthwise)
                for j in range(num_blocks[i])))
            channels += num_blocks[i] * growth_rates[i]
            if post_block_attention:
                parts.append(units.attention(channels, attention_inner_scale))
            self.stages.append(nn.Sequential(*parts))
        self.feature_channels.append(channels)
        self.feature_strides.append(stride)
        self.num_features = channels
        self.norm = nn.LayerNorm(channels)
        self.build_head(num_classes, head_type, channels, dropout_linear, family,
                        **family_options)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The map before each downsampling transition, and the last map."""
        x = self.stem(x)
        features = []
        for stage, downsample in zip(self.stages, self.downsample):
            if downsample:
                features.append(x)
            x = stage(x)
        features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)[-1]
        pooled = self.norm(x.mean(dim=tuple(range(2, x.dim()))))
        return pooled if self.classifier is None else self.classifier(pooled)


register_model("rdnet", RDNet, dims=(1, 2, 3), task="classification",
               description="RDNet of KAN convs (torch-conv-kan KAGNRDNet; any layout)")
for _variant, _layout in RDNET_VARIANTS.items():
    register_model(f"rdnet_{_variant}", RDNet, dims=(1, 2, 3), task="classification", **_layout,
                   description=f"RDNet-{_variant} of KAN convs (torch-conv-kan "
                               f"kagrdnet_{_variant})")

__all__ = ["RDNET_VARIANTS", "ChannelLayerNorm", "DegreeMajorDepthwiseConv", "EffectiveSE",
           "RDNet", "RDNetBlock"]
