"""The one KAN convolution, generic over 1D/2D/3D and over basis families.

``y = act(norm(conv(base_act(x), W_base) + conv(basis(x), W_basis)))``

Both branches run as a single convolution over the per-channel stack
``[base_act(x), basis_0(x), ..., basis_{n-1}(x)]`` (channel-major layout: expanded channel
``c * (n_basis + 1) + j``), with weights kept as two tensors (``base_weight`` and
``basis_weight``) so that adapters and checkpoint importers can address them separately.
Basis functions that are constants (``P_0 = 1`` of the polynomial families) are left out of
the stack: their weights, summed over each group's input channels, convolve one all-ones image
(the same result with zero padding, for ``1 / (C * n_expanded)`` of the arithmetic), so the
convolution reads ``n_convolved`` channels per input channel. With ``recompute=True`` the
stack is not kept for backward: it is rebuilt from ``x`` in the backward pass (see
:class:`kanseg.layers.expansion.ExpandConv`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .basis import Basis
from .compiled import compile_available, compiled_expand
from .errors import OptionError
from .expansion import ExpandConv, Expansion, autocast_dtype, expand, expand_with_base
from .factories import conv_function, create_activation, create_norm, to_tuple
from .regularization import DROPOUT_PLACEMENTS, create_dropout_module
from .strategy import STRATEGIES, block_diagonal, conv_strategy


class KANConv(nn.Module):
    """A KAN convolution layer for any basis family and 1, 2 or 3 spatial dims.

    ``conv_strategy`` picks how grouped convolutions run: ``"heuristic"`` (default,
    deterministic), ``"auto"`` (opt-in, timed once per shape), ``"grouped"`` or ``"dense"``;
    see :mod:`kanseg.layers.strategy`. ``dropout_placement`` (``"full"``: the input of both
    branches, ``"poly"``: the basis input only, ``"degree"``: each basis function) and
    ``dropout_type`` (channel dropout or noise injection of scale ``noise_scale``) say what
    ``dropout`` does; see :mod:`kanseg.layers.regularization`. In train mode, placements other
    than ``"full"`` build the stack under autograd (no recompute). ``compile_expansion=True``
    runs the expansion and its backward through kernels compiled by ``torch.compile``
    (:mod:`kanseg.layers.compiled`; eager where it cannot run): fewer passes over the
    expansion, worth it for layers at high resolution.
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
        dropout_placement: str = "full",
        dropout_type: str = "dropout",
        noise_scale: float = 0.05,
        affine: bool = True,
        recompute: bool = True,
        use_base: bool = True,
        conv_strategy: str = "heuristic",
        compile_expansion: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise OptionError("spatial_dims",
                              f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if groups < 1:
            raise OptionError("groups", f"groups must be a positive integer, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise OptionError("groups", f"in_channels ({in_channels}) and out_channels "
                              f"({out_channels}) must be divisible by groups ({groups})")
        if not 0.0 <= dropout < 1.0:
            raise OptionError("dropout", f"dropout must be in [0, 1), got {dropout!r}")
        if dropout_placement not in DROPOUT_PLACEMENTS:
            raise OptionError("dropout_placement", f"dropout_placement must be one of "
                              f"{DROPOUT_PLACEMENTS}, got {dropout_placement!r}")
        for name, flag in (("recompute", recompute), ("compile_expansion", compile_expansion)):
            if not isinstance(flag, bool):
                raise OptionError(name, f"{name} must be true or false, got {flag!r}")
        if conv_strategy not in STRATEGIES:
            raise OptionError("conv_strategy", f"conv_strategy must be one of {STRATEGIES}, "
                              f"got {conv_strategy!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_tuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = to_tuple(stride, spatial_dims, "stride")
        self.padding = to_tuple(padding, spatial_dims, "padding")
        self.dilation = to_tuple(dilation, spatial_dims, "dilation")
        self.groups = groups
        self.recompute = recompute
        self.conv_strategy = conv_strategy
        self.compile_expansion = compile_expansion
        self.basis = basis
        has_base = use_base and basis.use_base
        self.base_activation = (create_activation(base_activation, "base_activation")
                                if has_base else None)
        self.dropout_placement = dropout_placement
        self.dropout = create_dropout_module(spatial_dims, dropout, dropout_type, noise_scale)

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

    @property
    def n_convolved(self) -> int:
        """Expanded channels per input channel that the fused convolution reads (the constant
        basis functions are left out)."""
        return self.n_expanded - self.basis.n_basis + self.basis.n_varying

    def weight_per_basis_function(self) -> Tensor:
        """``basis_weight`` as ``(out, in / groups, n_basis, *kernel)``."""
        return self.basis_weight.view(self.out_channels, -1, self.basis.n_basis,
                                      *self.kernel_size)

    def fused_weight(self, first_basis: int = 0) -> Tensor:
        """Weight over the channel-major stack ``[base, basis_first_basis, ...]`` per input
        channel (``first_basis=0``: every basis function)."""
        basis_w = self.weight_per_basis_function()[:, :, first_basis:]
        if self.base_weight is not None:
            basis_w = torch.cat([self.base_weight.unsqueeze(2), basis_w], dim=2)
        return basis_w.flatten(1, 2)

    def constant_weight(self) -> Tensor | None:
        """``(out, 1, *kernel)``: the weights of the constant basis functions times their
        values, summed over each output channel's input channels; None without constants."""
        values = self.basis.constant_values()
        if not values:
            return None
        basis_w = self.weight_per_basis_function()[:, :, :len(values)]
        scale = basis_w.new_tensor(values).view((1, 1, -1) + (1,) * self.spatial_dims)
        return (basis_w * scale).sum((1, 2)).unsqueeze(1)

    def constant_response(self, x: Tensor) -> Tensor | None:
        """``(1, out, *S_out)``: the constant basis functions' share of the convolution, an
        all-ones image convolved with :meth:`constant_weight`; None without constants."""
        weight = self.constant_weight()
        if weight is None:
            return None
        dtype = torch.promote_types(x.dtype, weight.dtype)
        ones = x.new_ones((1, 1) + tuple(x.shape[2:]), dtype=dtype)
        return self.conv(ones, weight.to(dtype), 1)

    def uses_compiled_expansion(self, x: Tensor) -> bool:
        """Whether the expansion of ``x`` runs through the compiled kernels
        (``compile_expansion=True`` where ``torch.compile`` runs, not while tracing or inside
        a compiled model, which fuses the expansion itself)."""
        return (self.compile_expansion and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling()
                and compile_available(x.device, "the KAN layers' expansion"))

    def expand(self, x: Tensor) -> Tensor:
        """Expanded per-channel stack fed to the fused convolution (without the constant basis
        functions)."""
        if self.uses_compiled_expansion(x):
            x = x if torch.is_grad_enabled() else x.detach()  # one no-grad kernel for any x
            return compiled_expand(Expansion(self.basis, self.base_activation), x,
                                   *self.expansion_parameters())
        return expand(x, self.basis, self.base_activation)

    def expand_with_dropout(self, x: Tensor) -> Tensor:
        """The stack with dropout on the basis input (``"poly"``) or on each basis function
        (``"degree"``), the base branch seeing ``x`` itself; under autograd, so that backward
        sees the forward's dropout mask."""
        if self.dropout_placement == "poly":
            terms = self.basis.terms(self.dropout(x))
        else:
            dropped = self.dropout(self.basis(x).flatten(1, 2))
            terms = list(dropped.unflatten(1, (x.shape[1], self.basis.n_basis)).unbind(2))
        return expand_with_base(x, terms, self.base_activation)

    def expansion_parameters(self) -> list[nn.Parameter]:
        """Parameters of the expansion (basis, then base activation), as :class:`Expansion`
        orders them."""
        base = [] if self.base_activation is None else list(self.base_activation.parameters())
        return list(self.basis.parameters()) + base

    def conv(self, expanded: Tensor, weight: Tensor, groups: int) -> Tensor:
        """The fused convolution (one call for all groups and both branches)."""
        fn = conv_function(self.spatial_dims)
        return fn(expanded, weight, None, self.stride, self.padding, self.dilation, groups)

    def conv_weight(self, x: Tensor, first_basis: int = 0) -> tuple[Tensor, int]:
        """Fused weight (see :meth:`fused_weight`) and groups for the strategy (grouped or
        block-diagonal) chosen for ``x``."""
        weight = self.fused_weight(first_basis)
        expanded_shape = (x.shape[0], weight.shape[1] * self.groups) + tuple(x.shape[2:])
        strategy = conv_strategy(self.conv_strategy, expanded_shape, tuple(weight.shape),
                                 autocast_dtype(x) or x.dtype, x.device,
                                 (self.stride, self.padding, self.dilation), self.groups,
                                 backward=torch.is_grad_enabled())
        if strategy == "dense":
            return block_diagonal(weight, self.groups), 1
        return weight, self.groups

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"KANConv expected input of shape (B, {self.in_channels}, "
                f"{', '.join(['*'] * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        dropout = self.dropout if self.training else None
        if dropout is not None and self.dropout_placement == "full":
            x = dropout(x)
        if dropout is not None and self.dropout_placement != "full":
            y = self.conv(self.expand_with_dropout(x), *self.conv_weight(x))
            return self.act(self.norm(y))
        constant = self.constant_response(x)
        if not self.n_convolved:  # degree 0 without base branch: the constant alone
            return self.act(self.norm(constant.expand((x.shape[0],) + constant.shape[1:])))
        weight, groups = self.conv_weight(x, first_basis=len(self.basis.constant_values()))
        if self.recompute and torch.is_grad_enabled() and not torch.jit.is_tracing():
            y = ExpandConv.apply(x, weight, self, groups, *self.expansion_parameters())
        else:
            y = self.conv(self.expand(x), weight, groups)
        return self.act(self.norm(y if constant is None else y.add_(constant)))

    def extra_repr(self) -> str:
        return (
            f"{self.basis.family}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, recompute={self.recompute}, "
            f"conv_strategy={self.conv_strategy!r}, compile_expansion={self.compile_expansion}"
        )
