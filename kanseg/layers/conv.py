"""The one KAN convolution, generic over 1D/2D/3D and over basis families.

``y = act(norm(conv(base_act(x), W_base) + conv(basis(x), W_basis)))``

Both branches run as a single convolution over the per-channel stack
``[base_act(x), basis_0(x), ..., basis_{n-1}(x)]`` (channel-major layout: expanded channel
``c * (n_basis + 1) + j``), with weights kept as two tensors (``base_weight`` and
``basis_weight``) so that adapters and checkpoint importers can address them separately.
With ``recompute=True`` the expanded stack is not kept for backward: it is rebuilt from ``x``
in the backward pass (see :class:`_ExpandConv`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .basis import Basis
from .norm import create_norm
from .strategy import STRATEGIES, block_diagonal, conv_strategy

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DROPOUT = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}


def _ntuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    return value


def expand_with_base(x: Tensor, terms: list[Tensor], base_activation: nn.Module | None) -> Tensor:
    """Per-channel stack ``[base_act(x), *terms]`` flattened to ``(B, C*(n+1), *S)``."""
    if base_activation is not None:
        terms = [base_activation(x), *terms]
    return torch.stack(terms, dim=2).flatten(1, 2)


def expand(x: Tensor, basis: Basis, base_activation: nn.Module | None) -> Tensor:
    """``expand_with_base(x, basis.terms(x), base_activation)``; without autograd, the base slot
    and the basis functions are written straight into one preallocated buffer (not while
    tracing or compiling: traced graphs must also run with autograd on, and the compiler fuses
    the plain expression itself)."""
    if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return expand_with_base(x, basis.terms(x), base_activation)
    n_base = 0 if base_activation is None else 1
    out = x.new_empty((x.shape[0], x.shape[1], n_base + basis.n_basis) + tuple(x.shape[2:]))
    if base_activation is not None:
        out[:, :, 0] = base_activation(x)
    basis.expand_into(x, out[:, :, n_base:])
    return out.flatten(1, 2)


def _base_vjp(base_activation: nn.Module | None, x: Tensor, grad: Tensor) -> Tensor | None:
    """Gradient of ``base_activation(x)`` for parameter-free SiLU / identity, else None."""
    if type(base_activation) is nn.SiLU:
        return torch.ops.aten.silu_backward(grad, x)
    if type(base_activation) is nn.Identity:
        return grad
    return None


class _Expansion(nn.Module):
    """A layer's expansion ``x -> [base_act(x), *basis.terms(x)]`` as a module of its own, so
    that :func:`torch.func.functional_call` can run it with given parameter tensors."""

    def __init__(self, basis: Basis, base_activation: nn.Module | None):
        super().__init__()
        self.basis = basis
        self.base_activation = base_activation

    def forward(self, x: Tensor) -> Tensor:
        return expand(x, self.basis, self.base_activation)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a convolution in for ``x``, or None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _ExpandConv(torch.autograd.Function):
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
        ctx.compute_dtype = _autocast_dtype(x) or torch.promote_types(expanded.dtype, weight.dtype)
        ctx.save_for_backward(x, weight, *expansion_params)
        with torch.autocast(x.device.type, enabled=False):
            return layer.conv(expanded.to(ctx.compute_dtype), weight.to(ctx.compute_dtype), groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, *params = ctx.saved_tensors
        layer: KANConv = ctx.layer
        need_x = ctx.needs_input_grad[0]
        need_p = [p.requires_grad and need for p, need in zip(params, ctx.needs_input_grad[4:])]
        n_basis_params = len(list(layer.basis.parameters()))
        analytic = (type(layer.basis).expand_with_vjp is not Basis.expand_with_vjp
                    and len(params) == n_basis_params
                    and (layer.base_activation is None
                         or type(layer.base_activation) in (nn.SiLU, nn.Identity)))
        if analytic:
            grads = _ExpandConv._analytic_backward(ctx, grad_out, x, weight, params, need_x, need_p)
            if grads is not None:
                return grads
        return _ExpandConv._autograd_backward(ctx, grad_out, x, weight, params, need_x, need_p)

    @staticmethod
    def _conv_backward(ctx, grad_out: Tensor, expanded: Tensor, weight: Tensor, need_input: bool):
        layer: KANConv = ctx.layer
        dtype = ctx.compute_dtype
        grad_expanded, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), expanded.detach().to(dtype), weight.to(dtype), None,
            layer.stride, layer.padding, layer.dilation, False, [0] * layer.spatial_dims,
            ctx.groups, [need_input, ctx.needs_input_grad[1], False],
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
        shape = (x.shape[0], x.shape[1], layer.n_expanded) + tuple(x.shape[2:])
        with torch.no_grad():
            out = x.new_empty(shape)
            vjp = layer.basis.expand_with_vjp(x, out[:, :, n_base:], list(params))
            if vjp is None:
                return None
            if n_base:
                out[:, :, 0] = layer.base_activation(x)
        need_input = need_x or any(need_p)
        grad_expanded, grad_weight = _ExpandConv._conv_backward(ctx, grad_out, out.flatten(1, 2),
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
    def _autograd_backward(ctx, grad_out, x, weight, params, need_x, need_p):
        """Backward with the expansion recomputed under autograd (any basis, any activation)."""
        layer: KANConv = ctx.layer
        x_leaf = x.detach().requires_grad_(need_x)
        leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
        expansion = _Expansion(layer.basis, layer.base_activation)
        names = [name for name, _ in expansion.named_parameters()]
        with torch.enable_grad():
            expanded = functional_call(expansion, dict(zip(names, leaves)), (x_leaf,))
        grad_expanded, grad_weight = _ExpandConv._conv_backward(ctx, grad_out, expanded, weight,
                                                                need_x or any(need_p))
        inputs = ([x_leaf] if need_x else []) + [p for p, need in zip(leaves, need_p) if need]
        grads = list(torch.autograd.grad(expanded, inputs, grad_expanded.to(expanded.dtype),
                                         allow_unused=True)) if inputs else []
        grad_x = grads.pop(0) if need_x else None
        param_grads = [grads.pop(0) if need else None for need in need_p]
        return (grad_x, grad_weight, None, None, *param_grads)


class KANConv(nn.Module):
    """A KAN convolution layer for any basis family and 1, 2 or 3 spatial dims.

    ``conv_strategy`` picks how grouped convolutions run: ``"heuristic"`` (default,
    deterministic), ``"auto"`` (opt-in, timed once per shape), ``"grouped"`` or ``"dense"``;
    see :mod:`kanseg.layers.strategy`.
    """

    def __init__(
        self,
        basis: Basis,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        norm: str | None = "instance",
        activation: str | None = "silu",
        base_activation: str | None = "silu",
        dropout: float = 0.0,
        affine: bool = True,
        recompute: bool = True,
        use_base: bool = True,
        conv_strategy: str = "heuristic",
    ):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if conv_strategy not in STRATEGIES:
            raise ValueError(f"conv_strategy must be one of {STRATEGIES}, got {conv_strategy!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = _ntuple(stride, spatial_dims, "stride")
        self.padding = _ntuple(padding, spatial_dims, "padding")
        self.dilation = _ntuple(dilation, spatial_dims, "dilation")
        self.groups = groups
        self.recompute = recompute
        self.conv_strategy = conv_strategy
        self.basis = basis
        has_base = use_base and basis.use_base
        self.base_activation = create_activation(base_activation) if has_base else None
        self.dropout = _DROPOUT[spatial_dims](dropout) if dropout > 0 else None

        in_per_group = in_channels // groups
        kshape = (out_channels,) + (in_per_group,) + self.kernel_size
        self.base_weight = nn.Parameter(torch.empty(kshape)) if has_base else None
        self.basis_weight = nn.Parameter(
            torch.empty((out_channels, in_per_group * basis.n_basis) + self.kernel_size)
        )
        self.norm = create_norm(norm, spatial_dims, out_channels, affine=affine)
        self.act = create_activation(activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (linear gain) for both branches, as in torch-conv-kan."""
        if self.base_weight is not None:
            nn.init.kaiming_uniform_(self.base_weight, nonlinearity="linear")
        nn.init.kaiming_uniform_(self.basis_weight, nonlinearity="linear")

    @property
    def n_expanded(self) -> int:
        """Expanded channels per input channel (basis plus base slot)."""
        return self.basis.n_basis + (1 if self.base_weight is not None else 0)

    def fused_weight(self) -> Tensor:
        """Weight over the channel-major stack ``[base, basis_0, ...]`` per input channel."""
        out_ch, k = self.out_channels, self.kernel_size
        basis_w = self.basis_weight.view(out_ch, -1, self.basis.n_basis, *k)
        if self.base_weight is None:
            return self.basis_weight
        return torch.cat([self.base_weight.unsqueeze(2), basis_w], dim=2).flatten(1, 2)

    def expand(self, x: Tensor) -> Tensor:
        """Expanded per-channel stack fed to the fused convolution."""
        return expand(x, self.basis, self.base_activation)

    def expansion_parameters(self) -> list[nn.Parameter]:
        """Parameters of the expansion (basis, then base activation), as :class:`_Expansion`
        orders them."""
        base = [] if self.base_activation is None else list(self.base_activation.parameters())
        return list(self.basis.parameters()) + base

    def conv(self, expanded: Tensor, weight: Tensor, groups: int) -> Tensor:
        """The fused convolution (one call for all groups and both branches)."""
        fn = _CONV_FN[self.spatial_dims]
        return fn(expanded, weight, None, self.stride, self.padding, self.dilation, groups)

    def conv_weight(self, x: Tensor) -> tuple[Tensor, int]:
        """Fused weight and groups for the strategy (grouped or block-diagonal) chosen for ``x``."""
        weight = self.fused_weight()
        expanded_shape = (x.shape[0], self.in_channels * self.n_expanded) + tuple(x.shape[2:])
        strategy = conv_strategy(self.conv_strategy, expanded_shape, tuple(weight.shape),
                                 _autocast_dtype(x) or x.dtype, x.device,
                                 (self.stride, self.padding, self.dilation), self.groups)
        if strategy == "dense":
            return block_diagonal(weight, self.groups), 1
        return weight, self.groups

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KANConv expected input of shape (B, {self.in_channels}, "
                f"{', '.join(['*'] * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        if self.dropout is not None:
            x = self.dropout(x)
        weight, groups = self.conv_weight(x)
        if self.recompute and torch.is_grad_enabled() and not torch.jit.is_tracing():
            y = _ExpandConv.apply(x, weight, self, groups, *self.expansion_parameters())
        else:
            y = self.conv(self.expand(x), weight, groups)
        return self.act(self.norm(y))

    def extra_repr(self) -> str:
        return (
            f"{self.basis.family}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, recompute={self.recompute}, "
            f"conv_strategy={self.conv_strategy!r}"
        )


ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "prelu": nn.PReLU,
               "identity": nn.Identity}


def create_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or None, got {name!r}")
    return ACTIVATIONS[name]()
