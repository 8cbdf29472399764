"""The expansion ``x -> [base_act(x), varying basis functions of x]`` and the autograd
Function that convolves it without keeping it for backward (recompute, analytic VJPs).

Basis functions that do not depend on ``x`` (:meth:`Basis.constant_values`) are not part of
the expansion: the layer convolves them as one all-ones image (see :class:`KANConv`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .basis import Basis
from .compiled import compiled_expand, compiled_expand_with_vjp, expand_with_params

if TYPE_CHECKING:
    from .conv import KANConv


def expand_with_base(x: Tensor, terms: list[Tensor], base_activation: nn.Module | None) -> Tensor:
    """Per-channel stack ``[base_act(x), *terms]`` flattened to ``(B, C*(n+1), *S)``."""
    if base_activation is not None:
        terms = [base_activation(x), *terms]
    return torch.stack(terms, dim=2).flatten(1, 2)


def expand(x: Tensor, basis: Basis, base_activation: nn.Module | None) -> Tensor:
    """``expand_with_base(x, basis.varying_terms(x), base_activation)``; without autograd, the
    base slot and the basis functions are written straight into one preallocated buffer (not
    while tracing or compiling: traced graphs must also run with autograd on, and the compiler
    fuses the plain expression itself)."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return expand_with_base(x, basis.varying_terms(x), base_activation)
    n_base = 0 if base_activation is None else 1
    out = x.new_empty((x.shape[0], x.shape[1], n_base + basis.n_varying) + tuple(x.shape[2:]))
    if base_activation is not None:
        write_base(base_activation, x, out[:, :, 0])
    basis.expand_into(x, out[:, :, n_base:])
    return out.flatten(1, 2)


def write_base(base_activation: nn.Module, x: Tensor, out: Tensor) -> None:
    """``out[...] = base_activation(x)`` without a temporary for SiLU and identity."""
    if type(base_activation) is nn.SiLU:
        torch.ops.aten.silu.out(x, out=out)
    elif type(base_activation) is nn.Identity:
        out.copy_(x)
    else:
        out.copy_(base_activation(x))


def _base_vjp(base_activation: nn.Module | None, x: Tensor, grad: Tensor) -> Tensor | None:
    """Gradient of ``base_activation(x)`` for parameter-free SiLU / identity, else None."""
    if type(base_activation) is nn.SiLU:
        return torch.ops.aten.silu_backward(grad, x)
    if type(base_activation) is nn.Identity:
        return grad
    return None


class Expansion(nn.Module):
    """A layer's expansion ``x -> [base_act(x), *basis.terms(x)]`` as a module of its own, so
    that :func:`torch.func.functional_call` can run it with given parameter tensors."""

    def __init__(self, basis: Basis, base_activation: nn.Module | None):
        super().__init__()
        self.basis = basis
        self.base_activation = base_activation

    def forward(self, x: Tensor) -> Tensor:
        return expand(x, self.basis, self.base_activation)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a convolution in for ``x``, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class ExpandConv(torch.autograd.Function):
    """conv(expand(x), w) that saves only ``x`` and ``w`` and recomputes ``expand(x)`` in backward.

    The expansion's parameters are passed as inputs so that the backward recomputes with the very
    tensors used in forward (also under ``torch.func.functional_call``). Under autocast the
    convolution runs in the autocast dtype in both passes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, layer: "KANConv", groups: int,
                *expansion_params: Tensor) -> Tensor:
        with torch.no_grad():
            expanded = layer.expand(x)
        ctx.layer, ctx.groups = layer, groups
        ctx.compiled = layer.uses_compiled_expansion(x)
        ctx.compute_dtype = autocast_dtype(x) or torch.promote_types(expanded.dtype, weight.dtype)
        ctx.save_for_backward(x, weight, *expansion_params)
        with torch.autocast(x.device.type, enabled=False):
            return layer.conv(expanded.to(ctx.compute_dtype), weight.to(ctx.compute_dtype), groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, *params = ctx.saved_tensors
        layer: KANConv = ctx.layer
        need_x = ctx.needs_input_grad[0]
        need_p = [p.requires_grad and need for p, need in zip(params, ctx.needs_input_grad[4:])]
        if ctx.compiled:
            return ExpandConv._compiled_backward(ctx, grad_out, x, weight, params, need_x, need_p)
        n_basis_params = len(list(layer.basis.parameters()))
        analytic = (type(layer.basis).expand_with_vjp is not Basis.expand_with_vjp
                    and len(params) == n_basis_params
                    and (layer.base_activation is None
                         or type(layer.base_activation) in (nn.SiLU, nn.Identity)))
        if analytic:
            grads = ExpandConv._analytic_backward(ctx, grad_out, x, weight, params, need_x, need_p)
            if grads is not None:
                return grads
        return ExpandConv._autograd_backward(ctx, grad_out, x, weight, params, need_x, need_p)

    @staticmethod
    def _conv_backward(ctx, grad_out: Tensor, expanded: Tensor, weight: Tensor,
                       need_input: bool, need_weight: bool = True):
        """Gradients of the convolution for its input (the expansion; ``expanded`` may be an
        unwritten tensor of its shape when only this one is needed) and its weight."""
        layer: KANConv = ctx.layer
        dtype = ctx.compute_dtype
        grad_expanded, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), expanded.detach().to(dtype), weight.to(dtype), None,
            layer.stride, layer.padding, layer.dilation, False, [0] * layer.spatial_dims,
            ctx.groups, [need_input, need_weight and ctx.needs_input_grad[1], False],
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_expanded, grad_weight

    @staticmethod
    def _analytic_backward(ctx, grad_out, x, weight, params, need_x, need_p):
        """Backward with the expansion recomputed without autograd and differentiated by
        :meth:`Basis.expand_with_vjp`; None if the basis declines (then autograd is used)."""
        layer: KANConv = ctx.layer
        n_base = 0 if layer.base_activation is None else 1
        shape = (x.shape[0], x.shape[1], layer.n_convolved) + tuple(x.shape[2:])
        with torch.no_grad():
            out = x.new_empty(shape)
            vjp = layer.basis.expand_with_vjp(x, out[:, :, n_base:], list(params))
            if vjp is None:
                return None
            if n_base:
                write_base(layer.base_activation, x, out[:, :, 0])
        need_input = need_x or any(need_p)
        grad_expanded, grad_weight = ExpandConv._conv_backward(ctx, grad_out, out.flatten(1, 2),
                                                                weight, need_input)
        grad_x, param_grads = None, [None] * len(params)
        if need_input:
            del out
            grad = grad_expanded.to(x.dtype).view(shape)
            with torch.no_grad():
                grad_x, basis_grads = vjp(grad[:, :, n_base:])
                if n_base:
                    grad_x = grad_x + _base_vjp(layer.base_activation, x, grad[:, :, 0])
            grad_x = grad_x if need_x else None
            param_grads = [g if need else None for g, need in zip(basis_grads, need_p)]
        return (grad_x, grad_weight, None, None, *param_grads)

    @staticmethod
    def _compiled_backward(ctx, grad_out, x, weight, params, need_x, need_p):
        """Backward through the compiled kernels of :mod:`kanseg.layers.compiled`: the
        convolution's input gradient first (it needs only the weight), then one kernel that
        recomputes the expansion and differentiates it, then the weight gradient."""
        layer: KANConv = ctx.layer
        expansion = Expansion(layer.basis, layer.base_activation)
        shape = (x.shape[0], weight.shape[1] * ctx.groups) + tuple(x.shape[2:])
        grad_x, param_grads = None, [None] * len(params)
        with torch.no_grad():
            if need_x or any(need_p):
                # only the shape of the convolution's input is read (a broadcast placeholder
                # would be copied to contiguous memory by convolution_backward)
                unread = grad_out.new_empty(shape, dtype=ctx.compute_dtype)
                grad_expanded, _ = ExpandConv._conv_backward(ctx, grad_out, unread, weight,
                                                             True, False)
                expanded, grad_x, *grads = compiled_expand_with_vjp(
                    expansion, x, grad_expanded.to(x.dtype), *params)
                del grad_expanded
                grad_x = grad_x if need_x else None
                param_grads = [g if need else None for g, need in zip(grads, need_p)]
            else:
                expanded = compiled_expand(expansion, x, *params)
            grad_weight = None
            if ctx.needs_input_grad[1]:
                _, grad_weight = ExpandConv._conv_backward(ctx, grad_out, expanded, weight,
                                                           False)
        return (grad_x, grad_weight, None, None, *param_grads)

    @staticmethod
    def _autograd_backward(ctx, grad_out, x, weight, params, need_x, need_p):
        """Backward with the expansion recomputed under autograd (any basis, any activation)."""
        layer: KANConv = ctx.layer
        x_leaf = x.detach().requires_grad_(need_x)
        leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
        expansion = Expansion(layer.basis, layer.base_activation)
        with torch.enable_grad():
            expanded = expand_with_params(expansion, x_leaf, *leaves)
        grad_expanded, grad_weight = ExpandConv._conv_backward(ctx, grad_out, expanded, weight,
                                                                need_x or any(need_p))
        inputs = ([x_leaf] if need_x else []) + [p for p, need in zip(leaves, need_p) if need]
        grads = list(torch.autograd.grad(expanded, inputs, grad_expanded.to(expanded.dtype),
                                         allow_unused=True)) if inputs else []
        grad_x = grads.pop(0) if need_x else None
        param_grads = [grads.pop(0) if need else None for need in need_p]
        return (grad_x, grad_weight, None, None, *param_grads)
