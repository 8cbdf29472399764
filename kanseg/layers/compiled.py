"""Compiled expansion kernels: a layer's expansion ``x -> [base_act(x), basis(x)]``, alone
and with its vector-Jacobian product, each compiled by ``torch.compile`` (inductor) into a
few fused loops.

Eager, the expansion is a chain of elementwise passes over the whole stack (tanh, the
recurrence, the activations; again in the recomputing backward), which costs about as much
as the convolution itself when the convolution is grouped. Compiled, each kernel reads its
inputs once and writes its results once. One compiled function of each kind serves every
layer: dynamo guards on the expansion's type and options, so layers of one family and
options share their kernels, and a second input shape compiles a dynamic-shape kernel for the
rest. The first call of each compiles (seconds; inductor caches the code on disk for later
processes). Dynamo keeps at most ``recompile_limit`` versions of a function (8 by default)
and runs the function eagerly from then on; the kernels here keep up to
:data:`KERNEL_VERSIONS`, so that models and benchmarks with several families, option sets
and shapes keep their compiled kernels.

Where ``torch.compile`` cannot run (no C++ compiler on CPU, no Triton on GPU), a tiny probe
says so once per device type: a warning is logged and the layers run eagerly.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

log = logging.getLogger("kanseg")
_AVAILABLE: dict[str, bool] = {}


def _probe(x: Tensor) -> Tensor:
    return torch.sin(x) + 1


def compile_available(device: torch.device, purpose: str) -> bool:
    """Whether ``torch.compile`` (inductor) runs on ``device``'s type, probed once; if not, a
    warning naming ``purpose`` (what falls back to eager) and the error is logged."""
    if device.type not in _AVAILABLE:
        try:
            torch.compile(_probe)(torch.ones(2, device=device))
            _AVAILABLE[device.type] = True
        except Exception as err:  # noqa: BLE001 - whatever the backend raises, run eagerly
            log.warning("torch.compile cannot run on %s here (%s: %s); %s runs without "
                        "compilation", device.type, type(err).__name__,
                        str(err).split("\n", 1)[0], purpose)
            _AVAILABLE[device.type] = False
    return _AVAILABLE[device.type]


def expand_with_params(expansion: nn.Module, x: Tensor, *params: Tensor) -> Tensor:
    """``expansion(x)`` evaluated with ``params`` (its parameters in order); eager here, and
    the function both compiled kernels are built from."""
    names = [name for name, _ in expansion.named_parameters()]
    return functional_call(expansion, dict(zip(names, params)), (x,))


def _expand_with_vjp(expansion: nn.Module, x: Tensor, grad: Tensor, *params: Tensor
                     ) -> tuple[Tensor, ...]:
    """``expansion(x)`` and the gradients of ``<expansion(x), grad>`` for ``x`` and each of
    ``params``, from one pass over ``x`` and ``grad``."""
    expanded, pullback = torch.func.vjp(lambda x_, *p: expand_with_params(expansion, x_, *p), x, *params)
    return (expanded, *pullback(grad))


KERNEL_VERSIONS = 64
"""Compiled versions kept per kernel (one per family, option set, grad mode and static or
dynamic shape)."""


def _compile(fn: Callable[..., Tensor | tuple[Tensor, ...]]) -> Callable:
    """``torch.compile(fn)``, called with dynamo's recompile limit at :data:`KERNEL_VERSIONS`."""
    compiled = torch.compile(fn)

    @functools.wraps(fn)
    def run(*args: Tensor | nn.Module):
        with torch._dynamo.config.patch(recompile_limit=KERNEL_VERSIONS):
            return compiled(*args)

    return run


compiled_expand = _compile(expand_with_params)
compiled_expand_with_vjp = _compile(_expand_with_vjp)
