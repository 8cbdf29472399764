"""Factories of the layer core, generic over 1D/2D/3D: convolution functions, dropout, norms
and activations by name, and size tuples. Every dims-indexed table lives here."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import OptionError
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

NORMS = ("instance", "batch", "group", "layer", "none")


def create_norm(name: str | None, spatial_dims: int, channels: int, affine: bool = True,
                num_groups: int = 8) -> nn.Module:
    """Build ``instance``, ``batch``, ``group``, ``layer`` (one group) or ``none`` normalisation."""
    if name is None or name == "none":
        return nn.Identity()
    if name == "instance":
        cls = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}[spatial_dims]
        return cls(channels, affine=affine)
    if name == "batch":
        cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
        return cls(channels, affine=affine)
    if name == "group":
        groups = num_groups if channels % num_groups == 0 else 1
        return nn.GroupNorm(groups, channels, affine=affine)
    if name == "layer":
        return nn.GroupNorm(1, channels, affine=affine)
    raise OptionError("norm", f"norm must be one of {NORMS}, got {name!r}")


ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "prelu": nn.PReLU,
               "identity": nn.Identity}


def create_activation(name: str | None, key: str = "activation") -> nn.Module:
    """Activation module by name (None: identity); :class:`OptionError` for option ``key``
    if ``name`` is none of :data:`ACTIVATIONS`."""
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise OptionError(key, f"{key} must be one of {sorted(ACTIVATIONS)} or None, "
                               f"got {name!r}")
    return ACTIVATIONS[name]()


def conv_function(spatial_dims: int) -> Callable[..., Tensor]:
    """``F.conv1d`` / ``F.conv2d`` / ``F.conv3d``."""
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial_dims]


def conv_module(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``."""
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def create_dropout(spatial_dims: int, p: float) -> nn.Module | None:
    """Channel dropout for ``spatial_dims`` (None when ``p`` is 0)."""
    return {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims](p) if p > 0 else None


def to_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` as ``n`` ints; :class:`OptionError` for option ``name`` if a sequence has
    another length."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise OptionError(name, f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    return value
