"""Attach / merge / save / load the basis-coefficient method on a whole model."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import tuner
from .config import BasisConfig
from .layer import BasisLayer


def prepare(model: nn.Module, config: BasisConfig) -> nn.Module:
    """Freeze ``model`` and wrap its KAN layers in :class:`BasisLayer`."""
    return tuner.inject(model, config, BasisLayer)


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach a basis adapter saved with :func:`kanpeft.save_adapter`."""
    return tuner.load(model, directory, BasisConfig, BasisLayer)
