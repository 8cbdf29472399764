"""The typed error of a bad layer or model option, carrying the option's name."""
from __future__ import annotations


class OptionError(ValueError):
    """An option has a bad value; ``key`` is its keyword name (``"depth"``, ``"kan_levels"``),
    so a config can report it as ``model.<key>``."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class UnknownOptionError(OptionError):
    """``key`` is not an option of the model (or layer) at all."""
