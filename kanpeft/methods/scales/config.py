"""Configuration of the adapter-scales method."""
from __future__ import annotations

from dataclasses import dataclass

from ..common import AdapterConfig


@dataclass
class ScalesConfig(AdapterConfig):
    """IA3/SSF-style scales (initialised to 1) and shifts (initialised to 0) per KAN layer.

    ``base``: a scale per output channel on the base branch. ``basis``: a scale per output channel
    on the basis branch. ``degree``: a scale per basis function (degree). ``shift``: a shift per
    output channel after the norm (needs an affine norm to fold into when merging).
    """

    base: bool = True
    basis: bool = True
    degree: bool = True
    shift: bool = True

    def __post_init__(self) -> None:
        if not (self.base or self.basis or self.degree or self.shift):
            raise ValueError("nothing to train: enable at least one of base, basis, degree, shift")
