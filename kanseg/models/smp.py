"""KAN backbones as segmentation-models-pytorch encoders.

Importing this module registers ``kan-vgg11`` ... ``kan-vgg19v4`` and ``kan-<name>`` for every
registered ResKANet and DenseKANet variant (:data:`ENCODER_PREFIXES`: ``kan-reskanet18`` ...
``kan-moe_reskanet152``, ``kan-densekanet121`` ... ``kan-densekanet_tiny_moebn``; KAGN family)
in ``smp.encoders.encoders``, so that for example
``smp.Unet(encoder_name="kan-vgg11", encoder_weights=None, classes=2)`` works in 2D.
:func:`register_smp_encoder` adds variants (another family, width, bottleneck layers...).
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from segmentation_models_pytorch.encoders import encoders as SMP_ENCODERS
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import Tensor, nn

from .registry import create_model, get_model_spec, list_models
from .vgg import VGG_TYPES


class KANEncoder(nn.Module, EncoderMixin):
    """An smp encoder around a registered KAN backbone (``vgg_kan``, ``reskanet*``,
    ``densekanet*``).

    Returns ``depth + 1`` features at strides 1, 2, ..., 2**depth: the backbone's
    ``forward_features`` maps, preceded by the input when the first map is already downsampled
    and followed by 2x2 max-pools when the backbone has fewer stages than ``depth``.
    """

    def __init__(self, model_name: str, depth: int = 5, output_stride: int = 32,
                 in_channels: int = 3, **model_kwargs: Any):
        nn.Module.__init__(self)
        if not 1 <= depth <= 5:
            raise ValueError(f"{model_name} encoder depth must be in [1, 5], got {depth}")
        if output_stride != 32:
            raise ValueError(f"{model_name} encoders do not support output_stride={output_stride}"
                             " (dilated mode); use 32")
        self._model_name = model_name
        self._model_kwargs = model_kwargs
        self._depth = depth
        self._output_stride = output_stride
        self._build(in_channels)

    def _build(self, in_channels: int) -> None:
        self._in_channels = in_channels
        self.backbone = create_model(self._model_name, in_channels=in_channels, num_classes=0,
                                     **self._model_kwargs)
        channels = list(self.backbone.feature_channels)
        self._prepend_input = self.backbone.feature_strides[0] != 1
        if self._prepend_input:
            channels.insert(0, in_channels)
        channels += [channels[-1]] * (self._depth + 1 - len(channels))
        self._out_channels = channels

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Rebuild the backbone for ``in_channels`` (KAN encoders have no smp weights)."""
        if in_channels != self._in_channels:
            self._build(in_channels)

    def make_dilated(self, *args, **kwargs):
        raise ValueError("KAN encoders downsample by pooling/striding and have no dilated mode")

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.backbone.forward_features(x)
        if self._prepend_input:
            features = [x, *features]
        while len(features) < self._depth + 1:
            features.append(F.max_pool2d(features[-1], 2))
        return features[: self._depth + 1]


def register_smp_encoder(encoder_name: str, model_name: str, **model_kwargs: Any) -> None:
    """Make ``encoder_name`` usable as ``smp.<Arch>(encoder_name=...)`` for a KAN backbone."""
    SMP_ENCODERS[encoder_name] = {
        "encoder": KANEncoder,
        "pretrained_settings": {},
        "params": {"model_name": model_name, **model_kwargs},
    }


#: registered backbones whose feature maps sit at strides 2, 4, 8... (RDNet's patchify stem
#: starts at 4, which smp's decoders do not take)
ENCODER_PREFIXES = ("reskanet", "moe_reskanet", "densekanet")


def register_default_encoders() -> list[str]:
    """Register ``kan-vgg*`` (every vgg_type) and ``kan-<name>`` for every named variant (a
    registration with defaults) of :data:`ENCODER_PREFIXES`; returns the names."""
    names = []
    for vgg_type in VGG_TYPES:
        names.append(f"kan-{vgg_type.lower()}")
        register_smp_encoder(names[-1], "vgg_kan", vgg_type=vgg_type)
    for model_name in list_models():
        if model_name.startswith(ENCODER_PREFIXES) and get_model_spec(model_name).defaults:
            names.append(f"kan-{model_name}")
            register_smp_encoder(names[-1], model_name)
    return names


SMP_ENCODER_NAMES = register_default_encoders()

__all__ = ["ENCODER_PREFIXES", "KANEncoder", "SMP_ENCODER_NAMES", "register_default_encoders", "register_smp_encoder"]
