"""Configuration of the basis-coefficient method."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common import AdapterConfig


@dataclass
class BasisConfig(AdapterConfig):
    """Trainable deltas on the basis weights of chosen degrees, plus optional extra degrees.

    ``degrees``: polynomial degrees whose weights get a trainable delta (initialised to 0).
    ``extra_degrees``: new higher degrees appended to the basis, weights initialised to 0 (the
    merged layer then has degree + extra_degrees). ``train_shape``: trainable deltas on the basis
    shape parameters (e.g. the Gram ``beta`` weights), extra-degree entries included.
    """

    degrees: list[int] = field(default_factory=list)
    extra_degrees: int = 1
    train_shape: bool = True

    def __post_init__(self) -> None:
        if self.extra_degrees < 0:
            raise ValueError(f"extra_degrees must be >= 0, got {self.extra_degrees}")
        if any(d < 0 for d in self.degrees):
            raise ValueError(f"degrees must be >= 0, got {self.degrees}")
        if not self.degrees and not self.extra_degrees and not self.train_shape:
            raise ValueError("nothing to train: set degrees, extra_degrees > 0 or train_shape")
