"""The KAN layer core shared by kanseg and kanpeft."""
from __future__ import annotations

from .basis import BASIS_REGISTRY, Basis, basis_class, create_basis, register_basis
from .bottleneck import KANBottleneckConv
from .builder import LAYER_OPTIONS, create_kan_conv
from .conv import KANConv
from .errors import OptionError, UnknownOptionError
from .factories import ACTIVATIONS, NORMS, conv_function, create_activation, create_norm
from .linear import KANLinear, KANMLP

__all__ = [
    "ACTIVATIONS", "BASIS_REGISTRY", "LAYER_OPTIONS", "NORMS", "Basis", "KANBottleneckConv",
    "KANConv", "KANLinear", "KANMLP", "OptionError", "UnknownOptionError", "basis_class",
    "conv_function", "create_activation", "create_basis", "create_kan_conv", "create_norm",
    "register_basis",
]
