"""Normalisation layers by name, generic over spatial dims."""
from __future__ import annotations

from torch import nn

NORMS = ("instance", "batch", "group", "layer", "none")


def create_norm(name: str | None, spatial_dims: int, channels: int, affine: bool = True,
                num_groups: int = 8) -> nn.Module:
    """Build ``instance``, ``batch``, ``group``, ``layer`` (one group) or ``none`` normalisation."""
    if name is None or name == "none":
        return nn.Identity()
    if name == "instance":
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims]
        return cls(channels, affine=affine)
    if name == "batch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        return cls(channels, affine=affine)
    if name == "group":
        groups = num_groups if channels % num_groups == 0 else 1
        return nn.GroupNorm(groups, channels, affine=affine)
    if name == "layer":
        return nn.GroupNorm(1, channels, affine=affine)
    raise ValueError(f"norm must be one of {NORMS}, got {name!r}")
