"""Adapter scales for one KAN layer: per-channel / per-degree scales and a post-norm shift.

Every scale multiplies a weight slice, so merging writes the scaled weights; the shift sits
after the norm and folds into the norm's bias. The merge is therefore exact.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from kanseg.layers import KANBottleneckConv

from ..common import basis_conv, kan_forward
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

    def _weights(self) -> dict[str, Tensor]:
        """Effective weights to substitute in :func:`kan_forward` (and to write when merging)."""
        layer = self.base_layer
        core = basis_conv(layer)
        weights = {"basis_weight": scale_degrees(core.basis_weight, self.degree_scale)}
        if self.base_scale is not None:
            weights["base_weight"] = scale_rows(layer.base_weight, self.base_scale)
        if isinstance(layer, KANBottleneckConv):
            weights["out_proj_weight"] = scale_rows(layer.out_proj.weight, self.basis_scale)
        else:
            weights["basis_weight"] = scale_rows(weights["basis_weight"], self.basis_scale)
        return weights

    def _post_norm(self, y: Tensor) -> Tensor:
        return y + self.shift.view(1, -1, *([1] * (y.dim() - 2)))

    def forward(self, x: Tensor) -> Tensor:
        return kan_forward(self.base_layer, x, **self._weights(),
                           post_norm=self._post_norm if self.shift is not None else None)

    def merged_layer(self) -> nn.Module:
        merged = copy.deepcopy(self.base_layer)
        core = basis_conv(merged)
        weights = {k: nn.Parameter(v.detach().clone()) for k, v in self._weights().items()}
        core.basis_weight = weights["basis_weight"]
        if "base_weight" in weights:
            merged.base_weight = weights["base_weight"]
        if "out_proj_weight" in weights:
            merged.out_proj.weight = weights["out_proj_weight"]
        if self.shift is not None:
            with torch.no_grad():
                merged.norm.bias.add_(self.shift)
        return merged
