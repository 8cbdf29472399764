"""Basis-coefficient PEFT: deltas on chosen degrees, extra degrees, basis shape deltas."""
from .config import BasisConfig
from .layer import BasisLayer, extend_basis
from .model import load, prepare

__all__ = ["BasisConfig", "BasisLayer", "extend_basis", "load", "prepare"]
