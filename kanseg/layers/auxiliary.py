"""Auxiliary training losses: terms that modules add to the training loss.

Convention: a module that contributes a loss term implements ``auxiliary_loss() -> Tensor |
None``, the term from its most recent forward (None when there is none, e.g. in eval mode).
It may name its kind with a class attribute ``auxiliary_kind`` (``"weight_penalty"``,
``"load_balance"``...); otherwise the kind is its class name in snake case. The trainer adds
the sum of the terms to the loss and logs each kind.
"""
from __future__ import annotations

import re

from torch import Tensor, nn


def auxiliary_kind(module: nn.Module) -> str:
    """``module.auxiliary_kind``, or its class name in snake case (``MoEConv`` -> ``mo_e_conv``)."""
    kind = getattr(module, "auxiliary_kind", None)
    return kind or re.sub(r"(?<!^)(?=[A-Z])", "_", type(module).__name__).lower()


def collect_auxiliary_losses(model: nn.Module, by_kind: bool = False) -> dict[str, Tensor]:
    """The auxiliary terms of ``model``'s most recent forward: module name -> term, or with
    ``by_kind`` kind -> sum of its terms. Modules returning None are left out."""
    losses: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        method = getattr(module, "auxiliary_loss", None)
        term = method() if callable(method) else None
        if term is None:
            continue
        key = auxiliary_kind(module) if by_kind else name
        losses[key] = losses[key] + term if key in losses else term
    return losses


__all__ = ["auxiliary_kind", "collect_auxiliary_losses"]
