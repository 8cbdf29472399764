"""Adapter scales for one KAN layer: per-channel / per-degree scales and a post-norm shift.

Every scale multiplies a weight slice and the shift sits after the norm, in the norm's bias:
forward and merge substitute the same tensors, so the merge is exact.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kanseg.layers import KANBottleneckConv

from ..common import basis_conv, basis_prefix
from ..tuner import AdapterLayer
from .config import ScalesConfig


def scale_rows(weight: Tensor, scale: Tensor | None) -> Tensor:
    """Multiply output channel ``o`` of a conv weight by ``scale[o]``."""
    if scale is None:
        return weight
    return weight * scale.view(-1, *([1] * (weight.dim() - 1)))


def scale_degrees(weight: Tensor, scale: Tensor | None) -> Tensor:
    """Multiply the channel-major basis weight slice of basis function ``j`` by ``scale[j]``."""
    if scale is None:
        return weight
    n = scale.numel()
    w = weight.view(weight.shape[0], -1, n, *weight.shape[2:])
    return (w * scale.view(1, 1, n, *([1] * (weight.dim() - 2)))).flatten(1, 2)


class ScalesLayer(AdapterLayer):
    """``base_layer`` with learnable branch / degree scales and a post-norm shift."""

    method = "scales"

    def __init__(self, base_layer: nn.Module, config: ScalesConfig):
        super().__init__(base_layer, config)
        core = basis_conv(base_layer)
        out = base_layer.out_channels
        like = core.basis_weight
        ones = lambda n: nn.Parameter(torch.ones(n, dtype=like.dtype, device=like.device))  # noqa: E731
        has_base = base_layer.base_weight is not None
        self.base_scale = ones(out) if config.base and has_base else None
        self.basis_scale = ones(out) if config.basis else None
        self.degree_scale = ones(core.basis.n_basis) if config.degree else None
        self.shift = None
        if config.shift:
            bias = getattr(base_layer.norm, "bias", None)
            if not isinstance(bias, nn.Parameter):
                raise ValueError(
                    f"shift=True needs an affine norm to fold the shift into, but this layer's norm "
                    f"is {base_layer.norm.__class__.__name__} without a bias: use shift=False"
                )
            self.shift = nn.Parameter(torch.zeros_like(bias))

    def substitutions(self) -> tuple[dict[str, Tensor], dict[str, nn.Module]]:
        """Scaled weights, and the shift folded into the norm's bias (the shift follows the
        norm, so ``norm(y) + shift`` is the norm with bias ``bias + shift``)."""
        layer = self.base_layer
        prefix = basis_prefix(layer)
        basis_weight = scale_degrees(basis_conv(layer).basis_weight, self.degree_scale)
        tensors = {}
        if isinstance(layer, KANBottleneckConv):
            tensors["out_proj.weight"] = scale_rows(layer.out_proj.weight, self.basis_scale)
        else:
            basis_weight = scale_rows(basis_weight, self.basis_scale)
        tensors[f"{prefix}basis_weight"] = basis_weight
        if self.base_scale is not None:
            tensors["base_weight"] = scale_rows(layer.base_weight, self.base_scale)
        if self.shift is not None:
            tensors["norm.bias"] = layer.norm.bias + self.shift
        return tensors, {}
