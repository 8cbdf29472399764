"""Regularisers of torch-conv-kan (``utils/regularization.py``, ``gram_dropout_placement.py``)
on the one layer core.

- :class:`NoiseInjection`: additive (and optionally multiplicative) noise on a random subset of
  elements, in train mode only; a layer uses it in place of its dropout
  (``dropout_type``), at any ``dropout_placement``.
- :class:`WeightPenalty` and :class:`ActivationPenalty`: parameter-free children that a forward
  hook attaches to a KAN layer (:func:`attach_penalties`); each returns its term through
  ``auxiliary_loss()`` (see :mod:`kanseg.layers.auxiliary`), so the trainer adds it to the loss.

torch-conv-kan's ``L1`` / ``L2`` wrappers write ``weight_decay * sign(w)`` / ``weight_decay * w``
into the gradients from a backward hook; here they are loss terms with those gradients:
``l1 * sum|w|`` and ``l2 / 2 * sum w^2`` over the layer's trainable parameters (all of them,
as the wrappers without ``name``). The activation penalties are those of its trainers:
``l1 * mean(||y||_1 over the batch)`` and ``l2 * mean(||y||_2 over the batch)`` of each KAN
layer's output ``y``.

``dropout_placement="poly"`` drops the basis input ``x``; torch-conv-kan's KAGN layer drops
``tanh(x)`` inside its basis, so there the kept channels are tanh(x) / (1 - p) and here the
basis of x / (1 - p) (dropped channels agree: the basis of 0). Eval mode is the same.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import OptionError
from .factories import create_dropout

#: where a layer's dropout (or noise) acts, gram_dropout_placement's ``dropout_full`` /
#: ``dropout_poly`` / ``dropout_degree``: the input of both branches, the input of the basis
#: only, or each basis function (one channel per input channel and basis function)
DROPOUT_PLACEMENTS = ("full", "poly", "degree")
#: what a layer's ``dropout`` rate drives: channel dropout, or noise injection on elements
#: picked with that probability (torch-conv-kan's ``drop_type='noisy'``)
DROPOUT_TYPES = ("dropout", "noise", "multiplicative_noise")
#: layer options attaching penalties (torch-conv-kan's names)
PENALTY_OPTIONS = ("l1_penalty", "l2_penalty", "l1_activation_penalty", "l2_activation_penalty")


class NoiseInjection(nn.Module):
    """torch-conv-kan's ``NoiseInjection`` / ``NoiseMultiplicativeInjection``; identity in eval.

    Each element is picked with probability ``p`` and gets ``alpha * std_c * N(0, 1)`` added,
    ``std_c`` the (unbiased) standard deviation of its channel over batch and space. With
    ``multiplicative``, elements picked by a second mask also get ``x * (1 + beta * N(0, 1))``
    added. Random draws are made in torch-conv-kan's order (same seed, same noise).
    """

    def __init__(self, p: float = 0.0, alpha: float = 0.05, multiplicative: bool = False,
                 beta: float = 0.01):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"noise probability p must be in [0, 1], got {p!r}")
        if alpha < 0.0 or beta < 0.0:
            raise ValueError(f"noise scales must be >= 0, got alpha={alpha!r}, beta={beta!r}")
        self.p, self.alpha, self.multiplicative, self.beta = p, alpha, multiplicative, beta

    def _mask(self, x: Tensor) -> Tensor:
        return (torch.rand_like(x) < self.p).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        mask = self._mask(x)
        out = x
        if self.multiplicative:
            mask_m = self._mask(x)
            out = x + x * mask_m * (torch.randn_like(x) * self.beta + 1)
        std = x.std(dim=tuple(d for d in range(x.dim()) if d != 1), keepdim=True)
        return out + self.alpha * mask * (torch.randn_like(x) * std)

    def extra_repr(self) -> str:
        extra = f", multiplicative=True, beta={self.beta}" if self.multiplicative else ""
        return f"p={self.p}, alpha={self.alpha}{extra}"


def _non_negative(name: str, value: float | str) -> float:
    """``value`` as a float >= 0; strings such as ``"1e-6"`` (YAML 1.1 reads 1e-6 so) too."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        number = None
    if isinstance(value, bool) or number is None or not number >= 0:
        raise OptionError(name, f"{name} must be a number >= 0, got {value!r}")
    return number


def create_dropout_module(spatial_dims: int, p: float, dropout_type: str = "dropout",
                          noise_scale: float = 0.05) -> nn.Module | None:
    """A layer's dropout: channel dropout of rate ``p`` or :class:`NoiseInjection` with
    probability ``p`` and scale ``noise_scale``; None when ``p`` is 0."""
    if dropout_type not in DROPOUT_TYPES:
        raise OptionError("dropout_type",
                          f"dropout_type must be one of {DROPOUT_TYPES}, got {dropout_type!r}")
    if dropout_type == "dropout" or p == 0:
        return create_dropout(spatial_dims, p)
    return NoiseInjection(p, _non_negative("noise_scale", noise_scale),
                          multiplicative=dropout_type == "multiplicative_noise")


class _Penalty(nn.Module):
    """A parameter-free observer of one layer: :meth:`observe` (a forward hook of the layer)
    stores the layer's term in train mode, :meth:`auxiliary_loss` returns it."""

    def __init__(self, l1: float, l2: float):
        super().__init__()
        self.l1, self.l2 = l1, l2
        self._term: Tensor | None = None

    def penalty(self, layer: nn.Module, output: Tensor) -> Tensor | None:
        raise NotImplementedError

    def observe(self, layer: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._term = self.penalty(layer, output) if layer.training else None

    def auxiliary_loss(self) -> Tensor | None:
        """The term of the layer's most recent forward (None after an eval-mode forward)."""
        return self._term

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, EMA) start without the last term and its graph."""
        return {**self.__dict__, "_term": None}

    def extra_repr(self) -> str:
        return f"l1={self.l1}, l2={self.l2}"


class WeightPenalty(_Penalty):
    """``l1 * sum|w| + l2 / 2 * sum w^2`` over the layer's trainable parameters."""

    auxiliary_kind = "weight_penalty"

    def penalty(self, layer: nn.Module, output: Tensor) -> Tensor | None:
        params = [p for p in layer.parameters() if p.requires_grad]
        if not params:
            return None
        return sum(self.l1 * p.abs().sum() + 0.5 * self.l2 * p.square().sum() for p in params)


class ActivationPenalty(_Penalty):
    """``l1 * mean(||y||_1) + l2 * mean(||y||_2)``, norms over the batch dimension of the
    layer's output ``y``, mean over channels and positions (torch-conv-kan's trainers)."""

    auxiliary_kind = "activation_penalty"

    def penalty(self, layer: nn.Module, output: Tensor) -> Tensor:
        y = output.float()
        term = y.new_zeros(())
        if self.l1:
            term = term + self.l1 * torch.linalg.vector_norm(y, 1, dim=0).mean()
        if self.l2:
            term = term + self.l2 * torch.linalg.vector_norm(y, 2, dim=0).mean()
        return term


def attach_penalties(layer: nn.Module, l1_penalty: float = 0.0, l2_penalty: float = 0.0,
                     l1_activation_penalty: float = 0.0, l2_activation_penalty: float = 0.0
                     ) -> nn.Module:
    """Give ``layer`` children ``weight_penalty`` / ``activation_penalty`` (only those with a
    non-zero strength) fed by forward hooks; returns ``layer``. They hold no tensors of the
    state dict, so checkpoints are unchanged."""
    strengths = dict(l1_penalty=l1_penalty, l2_penalty=l2_penalty,
                     l1_activation_penalty=l1_activation_penalty,
                     l2_activation_penalty=l2_activation_penalty)
    l1, l2, l1_act, l2_act = (_non_negative(k, v) for k, v in strengths.items())
    for name, cls, a, b in (("weight_penalty", WeightPenalty, l1, l2),
                            ("activation_penalty", ActivationPenalty, l1_act, l2_act)):
        if a or b:
            penalty = cls(a, b)
            layer.add_module(name, penalty)
            layer.register_forward_hook(penalty.observe)
    return layer


__all__ = ["DROPOUT_PLACEMENTS", "DROPOUT_TYPES", "PENALTY_OPTIONS", "ActivationPenalty",
           "NoiseInjection", "WeightPenalty", "attach_penalties", "create_dropout_module"]
