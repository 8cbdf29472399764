"""Univariate basis families for KAN convolutions.

A basis maps an input ``x`` of shape ``(B, C, *spatial)`` to its expansion of shape
``(B, C, n_basis, *spatial)``. Each family is one small class registered by name; the
convolution core (:mod:`kanseg.layers.conv`) is shared by all of them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BASIS_REGISTRY: dict[str, type["Basis"]] = {}


def register_basis(name: str) -> Callable[[type["Basis"]], type["Basis"]]:
    """Class decorator that registers a basis family under ``name``."""

    def wrap(cls: type["Basis"]) -> type["Basis"]:
        BASIS_REGISTRY[name] = cls
        cls.family = name
        return cls

    return wrap


class Basis(nn.Module):
    """Base class: subclasses set ``n_basis`` and implement ``forward``.

    ``in_channels`` is the number of channels the basis sees (used by families with
    per-channel parameters and for initialisation scales).
    """

    family: str = ""
    n_basis: int = 0
    #: whether layers of this family have the base branch ``conv(act(x))``
    use_base: bool = True
    #: extra degrees for PEFT / polynomial families expose ``degree``
    degree: int | None = None

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_degree(degree: int) -> int:
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    return degree


@register_basis("kagn")
class GramBasis(Basis):
    """Gram polynomials of ``tanh(x)`` with learnable recurrence weights ``beta``.

    P0 = 1, P1 = t, P_{n} = t P_{n-1} - beta(n-1, n) P_{n-2}, with
    beta(n, m) = w_n * (m + n)(m - n) n^2 / (m^2 / (4 n^2 - 1)); the basis is SiLU(P).
    """

    def __init__(self, in_channels: int, degree: int = 3, kernel_numel: int = 9):
        super().__init__()
        self.degree = _check_degree(degree)
        self.n_basis = degree + 1
        std = 1.0 / (kernel_numel * in_channels * (degree + 1.0))
        self.beta_weights = nn.Parameter(torch.randn(degree + 1) * std)

    def recurrence_coefficients(self) -> Tensor:
        """Coefficient c_i multiplying P_{i-2} in the step to P_i (index i = 2..degree)."""
        n = torch.arange(self.degree + 1, dtype=torch.float64)
        m = n + 1
        const = (m + n) * (m - n) * n**2 / (m**2 / (4.0 * n**2 - 1.0))
        return const.to(self.beta_weights) * self.beta_weights

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tanh(x)
        polys = [torch.ones_like(t)]
        if self.degree >= 1:
            polys.append(t)
        coeff = self.recurrence_coefficients()
        for i in range(2, self.degree + 1):
            polys.append(t * polys[-1] - coeff[i - 1] * polys[-2])
        return F.silu(torch.stack(polys, dim=2))


def create_basis(family: str, in_channels: int, kernel_numel: int, **options) -> Basis:
    """Build a registered basis family by name."""
    if family not in BASIS_REGISTRY:
        raise ValueError(
            f"family must be one of {sorted(BASIS_REGISTRY)}, got {family!r}"
        )
    cls = BASIS_REGISTRY[family]
    try:
        return cls(in_channels=in_channels, kernel_numel=kernel_numel, **options)
    except TypeError as err:
        raise ValueError(f"invalid option for KAN family {family!r}: {err}") from None


__all__ = ["Basis", "BASIS_REGISTRY", "register_basis", "create_basis", "GramBasis"]
