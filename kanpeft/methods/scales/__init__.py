"""Adapter scales (IA3/SSF style) on the base and basis branches of KAN layers."""
from .config import ScalesConfig
from .layer import ScalesLayer
from .model import load, prepare

__all__ = ["ScalesConfig", "ScalesLayer", "load", "prepare"]
