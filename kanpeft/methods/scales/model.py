"""Attach / load the adapter-scales method on a whole model."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import tuner
from .config import ScalesConfig
from .layer import ScalesLayer


def prepare(model: nn.Module, config: ScalesConfig) -> nn.Module:
    """Freeze ``model`` and wrap its KAN layers in :class:`ScalesLayer`."""
    return tuner.inject(model, config, ScalesLayer)


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach a scales adapter saved with :func:`kanpeft.save_adapter`."""
    return tuner.load(model, directory, ScalesConfig, ScalesLayer)
