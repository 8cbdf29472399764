"""Univariate basis families for KAN convolutions.

A basis maps an input ``x`` of shape ``(B, C, *spatial)`` to its expansion of shape
``(B, C, n_basis, *spatial)``. Each family is one small class registered by name; the
convolution core (:mod:`kanseg.layers.conv`) is shared by all of them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import OptionError

BASIS_REGISTRY: dict[str, type["Basis"]] = {}


def tanh(x: Tensor) -> Tensor:
    """``torch.tanh(x)``, as ``2 sigmoid(2x) - 1`` for float32/64 on CPU: aten's CPU tanh is
    several times slower than its sigmoid (and the compiled tanh as slow), at an absolute error
    of at most 2e-7 in float32 (``benchmarks/layers.py`` times the layers that use it)."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or torch.jit.is_tracing()):  # exported graphs keep one Tanh
        return torch.tanh(x)
    s = torch.sigmoid(x * 2)
    if torch.is_grad_enabled() and s.requires_grad:
        return s * 2 - 1  # out of place: sigmoid's backward reads its output
    return s.mul_(2).sub_(1)


def register_basis(name: str) -> Callable[[type["Basis"]], type["Basis"]]:
    """Class decorator that registers a basis family under ``name``."""

    def wrap(cls: type["Basis"]) -> type["Basis"]:
        if cls.forward is Basis.forward and cls.terms is Basis.terms:  # each calls the other
            raise TypeError(f"basis {name!r} ({cls.__name__}) must implement forward() or terms()")
        BASIS_REGISTRY[name] = cls
        cls.family = name
        return cls

    return wrap


class Basis(nn.Module):
    """Base class: subclasses set ``n_basis`` and implement ``forward`` (one stacked tensor) or
    ``terms`` (the list of basis functions, for recurrences; saves a copy in the layer).

    ``in_channels`` is the number of channels the basis sees (used by families with
    per-channel parameters and for initialisation scales).
    """

    family: str = ""
    n_basis: int = 0
    #: whether layers of this family have the base branch ``conv(act(x))``
    use_base: bool = True
    #: polynomial families (one basis function per degree 0..degree): the highest degree;
    #: None for the others (kanpeft's extra-degree and per-degree methods need a polynomial)
    degree: int | None = None
    #: B-spline and ReLU-bump families: the order of their piecewise functions; None otherwise
    order: int | None = None
    #: layer options this family uses unless the caller sets them (torch-conv-kan's choices)
    layer_defaults: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S)`` -> ``(B, C, n_basis, *S)``."""
        return torch.stack(self.terms(x), dim=2)

    def terms(self, x: Tensor) -> list[Tensor]:
        """The ``n_basis`` basis functions of ``x``, each shaped like ``x``."""
        return list(self(x).unbind(2))

    def constant_values(self) -> tuple[float, ...]:
        """Values of the leading basis functions that do not depend on ``x`` (``P_0 = 1`` of
        the polynomial recurrences); none by default. The layer does not convolve them channel
        by channel: their weights, summed over the input channels, convolve one all-ones image.
        """
        return ()

    @property
    def n_varying(self) -> int:
        """Basis functions after the constant ones."""
        return self.n_basis - len(self.constant_values())

    def varying_terms(self, x: Tensor) -> list[Tensor]:
        """The basis functions after the constant ones."""
        return self.terms(x)[len(self.constant_values()):]

    def expand_into(self, x: Tensor, out: Tensor) -> None:
        """Write :meth:`varying_terms` of ``x`` into ``out`` (``(B, C, n_varying, *S)``,
        possibly a strided view). Used without autograd; families may override it to skip
        temporaries."""
        for k, term in enumerate(self.varying_terms(x)):
            out[:, :, k] = term

    def expand_with_vjp(self, x: Tensor, out: Tensor, params: list[Tensor]
                        ) -> Callable[[Tensor], tuple[Tensor, list[Tensor]]] | None:
        """Like :meth:`expand_into` but evaluated with ``params`` (the basis parameters in
        ``parameters()`` order), returning the analytic vector-Jacobian product of the basis:
        a function of ``grad`` (shaped like ``out``) giving the gradients of ``x`` and of
        each parameter. Returns None, writing nothing, to let autograd differentiate the basis
        (the default)."""
        return None


def _check_degree(degree: int, name: str = "degree") -> int:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise OptionError(name, f"{name} must be an integer >= 0, got {degree!r}")
    return degree


def _check_grid(grid_size: int, grid_range: Sequence[float], minimum: int = 1) -> tuple[float, float]:
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < minimum:
        raise OptionError("grid_size",
                          f"grid_size must be an integer >= {minimum}, got {grid_size!r}")
    lo, hi = (float(v) for v in grid_range)
    if not hi > lo:
        raise OptionError("grid_range",
                          f"grid_range must be (low, high) with low < high, "
                          f"got {tuple(grid_range)!r}")
    return lo, hi


def _channel_param(param: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-channel ``(C_group, n)`` parameter against ``x.unsqueeze(2)``.

    Grouped layers run all groups in one call, so ``x`` holds ``groups * C_group`` channels;
    like torch-conv-kan, every group shares the same per-channel parameters. A parameter of
    ``k * C_group`` rows is tiled instead: group ``g`` reads rows of block ``g % k``
    (``k = groups``: each group its own).
    """
    if not torch.jit.is_tracing() and x.shape[1] % param.shape[0]:
        raise ValueError(f"a per-channel basis parameter of {param.shape[0]} rows does not tile "
                         f"the input's {x.shape[1]} channels")
    groups = x.shape[1] // param.shape[0]
    return param.repeat(groups, 1).view((1, x.shape[1], param.shape[1]) + (1,) * (x.dim() - 2))


class PolynomialBasis(Basis):
    """A family of polynomials of degree 0..``degree``: one basis function per degree."""

    def __init__(self, in_channels: int, degree: int = 3, kernel_numel: int = 9):
        super().__init__()
        self.degree = _check_degree(degree)
        self.n_basis = degree + 1


def _sub_scaled_(target: Tensor, tensor: Tensor, scale: Tensor | float) -> None:
    """``target -= scale * tensor`` in place, for a 0-dim tensor or a float ``scale``."""
    if isinstance(scale, Tensor):
        target.addcmul_(tensor, -scale)
    else:
        target.add_(tensor, alpha=-scale)


class OutputActivation(NamedTuple):
    """An activation of the basis functions: differentiable, written into a tensor (``out``
    may be the input itself), its backward ``(grad, input) -> grad_input`` and its value at 1
    (the activated ``P_0``)."""

    function: Callable[[Tensor], Tensor]
    write_into: Callable[[Tensor, Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    at_one: float


#: activations a recurrence basis may apply to its polynomials
OUTPUT_ACTIVATIONS: dict[str, OutputActivation] = {
    "silu": OutputActivation(F.silu, lambda p, out: torch.ops.aten.silu.out(p, out=out),
                             torch.ops.aten.silu_backward, 1.0 / (1.0 + math.exp(-1.0))),
    # (aten's gelu.out ignores the strides of a non-contiguous ``out``: through a temporary)
    "gelu": OutputActivation(F.gelu, lambda p, out: out.copy_(F.gelu(p)),
                             lambda grad, p: torch.ops.aten.gelu_backward(grad, p),
                             0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))),
    "relu": OutputActivation(F.relu, lambda p, out: torch.clamp(p, min=0, out=out),
                             lambda grad, p: torch.ops.aten.threshold_backward(grad, p, 0), 1.0),
}


class RecurrenceBasis(PolynomialBasis):
    """Polynomials of ``t = argument(x)`` by a three-term recurrence, with one analytic VJP.

    P_0 = 1, P_1 = a_1 t + b_1, P_n = (a_n t + b_n) P_{n-1} - c_n P_{n-2}; the basis is P, or
    ``output_activation``(P) (a key of :data:`OUTPUT_ACTIVATIONS`). A family gives the argument
    and its VJP, and the coefficients (``c`` may depend on the basis parameters: their gradients
    come from autograd over the ``degree + 1`` coefficients, the elementwise work is
    differentiated analytically).
    """

    output_activation: str | None = None

    def argument(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``t`` and its VJP (``grad_t -> grad_x``); ``tanh(x)`` by default."""
        t = tanh(x)
        return t, lambda grad_t: torch.ops.aten.tanh_backward(grad_t, t)

    def recurrence(self, params: list[Tensor], like: Tensor
                   ) -> tuple[list[float], list[float], Tensor | list[float]]:
        """``(a, b, c)`` indexed by n (``a[0]``, ``b[0]``, ``c[0]``, ``c[1]`` unused); ``c`` is
        either constants or a tensor like ``like`` computed from ``params`` (the basis
        parameters in order)."""
        raise NotImplementedError

    def constant_values(self) -> tuple[float, ...]:
        if self.output_activation is None:
            return (1.0,)
        return (OUTPUT_ACTIVATIONS[self.output_activation].at_one,)

    def _polynomials_into(self, t: Tensor, a: list[float], b: list[float],
                          c: Tensor | list[float], out: Tensor) -> None:
        """P_1..P_degree of ``t`` written into ``out[:, :, n - 1]`` (P_0 = 1 is implicit),
        without autograd."""
        if self.degree >= 1:
            out[:, :, 0] = t
            if a[1] != 1.0 or b[1]:
                out[:, :, 0].mul_(a[1]).add_(b[1])
        for n in range(2, self.degree + 1):
            p_n, p_prev = out[:, :, n - 1], out[:, :, n - 2]
            torch.mul(t, p_prev, out=p_n)
            if a[n] != 1.0:
                p_n.mul_(a[n])
            if b[n]:
                p_n.add_(p_prev, alpha=b[n])
            if n == 2:
                p_n.sub_(c[n])
            else:
                _sub_scaled_(p_n, out[:, :, n - 3], c[n])

    def terms(self, x: Tensor) -> list[Tensor]:
        return [torch.full_like(x, self.constant_values()[0]), *self.varying_terms(x)]

    def varying_terms(self, x: Tensor) -> list[Tensor]:
        """P_1..P_degree (activated) under autograd; P_0 = 1 enters through ``c_2``."""
        t, _ = self.argument(x)
        a, b, c = self.recurrence(list(self.parameters()), t)
        polys: list[Tensor] = []
        for n in range(1, self.degree + 1):
            step = t if (a[n] == 1.0 and not b[n]) else a[n] * t + b[n]
            if n == 1:
                polys.append(step)
            elif n == 2:
                polys.append(step * polys[-1] - c[n])
            else:
                polys.append(step * polys[-1] - c[n] * polys[-2])
        if self.output_activation is None:
            return polys
        return [OUTPUT_ACTIVATIONS[self.output_activation].function(p) for p in polys]

    def expand_into(self, x: Tensor, out: Tensor) -> None:
        t, _ = self.argument(x)
        self._polynomials_into(t, *self.recurrence(list(self.parameters()), t), out)
        if self.output_activation is not None:
            OUTPUT_ACTIVATIONS[self.output_activation].write_into(out, out)

    def expand_with_vjp(self, x: Tensor, out: Tensor, params: list[Tensor]
                        ) -> Callable[[Tensor], tuple[Tensor, list[Tensor]]]:
        t, t_vjp = self.argument(x)
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
        with torch.enable_grad():
            a, b, c_graph = self.recurrence(leaves, t)
        c = c_graph.detach() if isinstance(c_graph, Tensor) else c_graph
        activation = (OUTPUT_ACTIVATIONS[self.output_activation]
                      if self.output_activation is not None else None)
        polys = x.new_empty(out.shape) if activation is not None else out  # P_1..P_degree
        self._polynomials_into(t, a, b, c, polys)
        if activation is not None:
            activation.write_into(polys, out)
        trained = [leaf for leaf in leaves if leaf.requires_grad]

        def vjp(grad: Tensor) -> tuple[Tensor, list[Tensor]]:
            g = grad if activation is None else activation.backward(grad, polys)
            grad_c = torch.zeros_like(c) if trained else None
            grad_t = torch.zeros_like(t) if self.degree < 2 else None
            for n in range(self.degree, 1, -1):  # reverse of P_n = (a t + b) P_{n-1} - c P_{n-2}
                g_n, p_prev = g[:, :, n - 1], polys[:, :, n - 2]
                if trained:
                    grad_c[n] = -(g_n.sum() if n == 2 else (g_n * polys[:, :, n - 3]).sum())
                if grad_t is None:
                    grad_t = g_n * p_prev
                    if a[n] != 1.0:
                        grad_t.mul_(a[n])
                else:
                    grad_t.addcmul_(g_n, p_prev, value=a[n])
                g[:, :, n - 2].addcmul_(g_n, t, value=a[n])
                if b[n]:
                    g[:, :, n - 2].add_(g_n, alpha=b[n])
                if n > 2:
                    _sub_scaled_(g[:, :, n - 3], g_n, c[n])
            if self.degree >= 1:
                grad_t.add_(g[:, :, 0], alpha=a[1])
            grads = iter(torch.autograd.grad(c_graph, trained, grad_c) if trained else [])
            return t_vjp(grad_t), [next(grads) if leaf.requires_grad else None for leaf in leaves]

        return vjp


@register_basis("kagn")
class GramBasis(RecurrenceBasis):
    """Gram polynomials of ``tanh(x)`` with learnable recurrence weights ``beta``.

    P0 = 1, P1 = t, P_{n} = t P_{n-1} - beta(n-1, n) P_{n-2}, with
    beta(n, m) = w_n * (m + n)(m - n) n^2 / (m^2 / (4 n^2 - 1)); the basis is SiLU(P), or
    ``basis_activation``(P) (torch-conv-kan's ``GRAMLayer`` applies its ``act``, GELU in
    ``mlp_kagn``).
    """

    def __init__(self, in_channels: int, degree: int = 3, kernel_numel: int = 9,
                 basis_activation: str = "silu"):
        super().__init__(in_channels, degree, kernel_numel)
        if basis_activation not in OUTPUT_ACTIVATIONS:
            raise OptionError("basis_activation", f"basis_activation must be one of "
                              f"{sorted(OUTPUT_ACTIVATIONS)}, got {basis_activation!r}")
        self.basis_activation = self.output_activation = basis_activation
        std = 1.0 / (kernel_numel * in_channels * (degree + 1.0))
        self.beta_weights = nn.Parameter(torch.randn(degree + 1) * std)

    def recurrence(self, params: list[Tensor], like: Tensor
                   ) -> tuple[list[float], list[float], Tensor]:
        (beta,) = params
        n = torch.arange(self.degree + 1, dtype=torch.float64)
        m = n + 1
        coeff = ((m + n) * (m - n) * n**2 / (m**2 / (4.0 * n**2 - 1.0))).to(beta) * beta
        c = torch.cat([coeff.new_zeros(1), coeff[:-1]]).to(like.dtype)  # c_n = beta(n-1, n)
        return [1.0] * (self.degree + 1), [0.0] * (self.degree + 1), c


class _FixedRecurrence(RecurrenceBasis):
    """A recurrence with constant coefficients ``step(n) = (a_n, b_n, c_n)``."""

    def step(self, n: int) -> tuple[float, float, float]:
        raise NotImplementedError

    def recurrence(self, params: list[Tensor], like: Tensor
                   ) -> tuple[list[float], list[float], list[float]]:
        steps = [(0.0, 0.0, 0.0)] + [self.step(n) for n in range(1, self.degree + 1)]
        a, b, c = (list(column) for column in zip(*steps))
        return a, b, c


def _group_minmax(x: Tensor, channels_per_group: int
                  ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``x`` scaled to [-1, 1] by its min and max over each group (batch included), and the VJP
    of that scaling (ties of the min or max share their gradient evenly, as autograd does)."""
    grouped = x.reshape(x.shape[0], x.shape[1] // channels_per_group, -1)
    lo = grouped.amin(dim=(0, 2), keepdim=True)
    hi = grouped.amax(dim=(0, 2), keepdim=True)
    tiny = torch.finfo(x.dtype).tiny
    span = (hi - lo).clamp_min(tiny)
    s = 2.0 * (grouped - lo) / span - 1.0

    def vjp(grad_s: Tensor) -> Tensor:
        g = grad_s.reshape(grouped.shape)
        dims = (0, 2)
        grad_span = -(g * (s + 1.0)).sum(dims, keepdim=True) / span * ((hi - lo) >= tiny)
        grad_lo = -2.0 * g.sum(dims, keepdim=True) / span - grad_span
        grad_x = g * (2.0 / span)
        for value, grad in ((lo, grad_lo), (hi, grad_span)):
            ties = (grouped == value).to(x.dtype)
            grad_x.addcmul_(ties, grad / ties.sum(dims, keepdim=True))
        return grad_x.view_as(x)

    return s.view_as(x), vjp


@register_basis("kaln")
class LegendreBasis(_FixedRecurrence):
    """Legendre polynomials of ``x`` min-max scaled to [-1, 1] over each group.

    P0 = 1, P1 = s, (n + 1) P_{n+1} = (2n + 1) s P_n - n P_{n-1}. The base branch sees ``x``
    without activation, as in torch-conv-kan's KALN.
    """

    layer_defaults = {"base_activation": "identity"}

    def __init__(self, in_channels: int, degree: int = 3, kernel_numel: int = 9):
        super().__init__(in_channels, degree, kernel_numel)
        self.in_channels = in_channels

    def argument(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        return _group_minmax(x, self.in_channels)

    def step(self, n: int) -> tuple[float, float, float]:
        return (2 * n - 1) / n, 0.0, (n - 1) / n


@register_basis("kacn")
class ChebyshevBasis(_FixedRecurrence):
    """Chebyshev polynomials of the first kind of ``tanh(x)``: T_n(t) = cos(n arccos t).

    Evaluated by the recurrence T_{n+1} = 2 t T_n - T_{n-1}, which equals torch-conv-kan's
    arccos form on [-1, 1] and has bounded gradients at the ends. No base branch and, by
    default, no output activation (as torch-conv-kan's KACN).
    """

    use_base = False
    layer_defaults = {"activation": None}

    def step(self, n: int) -> tuple[float, float, float]:
        return (1.0, 0.0, 0.0) if n == 1 else (2.0, 0.0, 1.0)


@register_basis("kajn")
class JacobiBasis(_FixedRecurrence):
    """Jacobi polynomials P_n^(alpha, beta) of ``tanh(x)`` by the three-term recurrence.

    The base branch sees ``x`` without activation, as in torch-conv-kan's KAJN.
    """

    layer_defaults = {"base_activation": "identity"}

    def __init__(self, in_channels: int, degree: int = 3, kernel_numel: int = 9,
                 alpha: float = 1.0, beta: float = 1.0):
        super().__init__(in_channels, degree, kernel_numel)
        if not (alpha > -1.0 and beta > -1.0):
            raise OptionError("alpha",
                              f"alpha and beta must be > -1, got alpha={alpha!r}, beta={beta!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def step(self, n: int) -> tuple[float, float, float]:
        a, b = self.alpha, self.beta
        if n == 1:
            return 0.5 * (a + b + 2), 0.5 * (a - b), 0.0
        s = 2 * n + a + b
        denom = 2 * n * (n + a + b) * (s - 2)
        return (s * (s - 1) * (s - 2) / denom, (s - 1) * (a * a - b * b) / denom,
                2 * (n + a - 1) * (n + b - 1) * s / denom)


@register_basis("kabn")
class BernsteinBasis(PolynomialBasis):
    """Bernstein polynomials b_{k,n}(t) = C(n, k) t^k (1 - t)^(n - k) of ``t = sigmoid(x)``.

    torch-conv-kan's KABN evaluates a de Casteljau recursion seeded with ones, which makes
    every basis function 1; this class computes the Bernstein basis it intends. The base
    branch sees ``x`` without activation, as there. Analytic VJP: db_k/dx = b_k (k - n t).
    """

    layer_defaults = {"base_activation": "identity"}

    def terms(self, x: Tensor) -> list[Tensor]:
        t = torch.sigmoid(x)
        s = torch.sigmoid(-x)  # 1 - t without cancellation
        t_pows, s_pows = [torch.ones_like(t)], [torch.ones_like(t)]
        for _ in range(self.degree):
            t_pows.append(t_pows[-1] * t)
            s_pows.append(s_pows[-1] * s)
        n = self.degree
        return [math.comb(n, k) * t_pows[k] * s_pows[n - k] for k in range(n + 1)]

    def _bernstein_into(self, x: Tensor, out: Tensor) -> Tensor:
        """The basis written into ``out`` without autograd; returns ``t``."""
        n = self.degree
        t, s = torch.sigmoid(x), torch.sigmoid(-x)
        out[:, :, 0] = 1.0
        for k in range(1, n + 1):  # t^k
            torch.mul(out[:, :, k - 1], t, out=out[:, :, k])
        s_pow = torch.ones_like(s)
        for k in range(n - 1, -1, -1):  # times C(n, k) s^(n - k)
            out[:, :, k].mul_(s_pow.mul_(s)).mul_(math.comb(n, k))
        return t

    def expand_into(self, x: Tensor, out: Tensor) -> None:
        self._bernstein_into(x, out)

    def expand_with_vjp(self, x: Tensor, out: Tensor, params: list[Tensor]
                        ) -> Callable[[Tensor], tuple[Tensor, list[Tensor]]]:
        t = self._bernstein_into(x, out)

        def vjp(grad: Tensor) -> tuple[Tensor, list[Tensor]]:
            weighted = grad * out  # g_k b_k
            ks = torch.arange(self.degree + 1, dtype=x.dtype, device=x.device)
            ks = ks.view((1, 1, -1) + (1,) * (x.dim() - 2))
            grad_x = (weighted * ks).sum(2) - self.degree * t * weighted.sum(2)
            return grad_x, []

        return vjp


#: how the Gaussian RBF basis normalises its input (``input_norm``)
RBF_INPUT_NORMS = ("instance", "channel_layer")


@register_basis("fastkan")
class GaussianRBFBasis(Basis):
    """Gaussian radial basis exp(-((z - g_j) / h)^2) on ``grid_size`` points of ``grid_range``.

    ``z`` is ``x`` normalised as ``input_norm`` says: ``"instance"`` (per sample and channel
    over positions, no affine), as torch-conv-kan's FastKAN convs normalise their input, or
    ``"channel_layer"`` (a LayerNorm across the channels of each group at every position,
    with per-channel scale and shift), as its ``FastKANLayer`` does. ``h`` defaults to the grid
    spacing. FastKAN layers have no output norm or activation by default. Analytic VJP through
    the Gaussians and the instance norm; autograd through the channel LayerNorm.
    """

    layer_defaults = {"norm": "none", "activation": None}

    def __init__(self, in_channels: int, kernel_numel: int = 9, grid_size: int = 8,
                 grid_range: Sequence[float] = (-2.0, 2.0), denominator: float | None = None,
                 eps: float = 1e-5, input_norm: str = "instance"):
        super().__init__()
        lo, hi = _check_grid(grid_size, grid_range, minimum=2)
        if input_norm not in RBF_INPUT_NORMS:
            raise OptionError("input_norm", f"input_norm must be one of {RBF_INPUT_NORMS}, "
                              f"got {input_norm!r}")
        self.n_basis = grid_size
        self.denominator = float(denominator) if denominator else (hi - lo) / (grid_size - 1)
        self.eps = eps
        self.grid_range = (lo, hi)
        self.input_norm = input_norm
        if input_norm == "channel_layer":
            self.layer_norm = nn.LayerNorm(in_channels, eps=eps)

    def grid(self, like: Tensor) -> Tensor:
        """The ``grid_size`` centres in ``like``'s dtype and device, shaped ``(1, 1, n, 1...)``."""
        grid = torch.linspace(*self.grid_range, self.n_basis, dtype=like.dtype, device=like.device)
        return grid.view((1, 1, -1) + (1,) * (like.dim() - 2))

    def _channel_layer_norm(self, x: Tensor) -> Tensor:
        """``x`` layer-normalised across the channels of each group at every position."""
        channels_last = x.movedim(1, -1).unflatten(-1, (-1, self.layer_norm.normalized_shape[0]))
        return self.layer_norm(channels_last).flatten(-2).movedim(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_norm == "channel_layer":
            z = self._channel_layer_norm(x)
        else:
            dims = tuple(range(2, x.dim()))
            mean = x.mean(dim=dims, keepdim=True)
            var = (x - mean).square().mean(dim=dims, keepdim=True)
            z = (x - mean) * torch.rsqrt(var + self.eps)
        return torch.exp(-((z.unsqueeze(2) - self.grid(x)) / self.denominator).square())

    def _rbf_into(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """The basis written into ``out`` without autograd; returns ``z`` and ``1 / sigma``."""
        dims = tuple(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        inv_std = torch.rsqrt(var + self.eps)
        z = (x - mean).mul_(inv_std)
        torch.sub(z.unsqueeze(2), self.grid(x), out=out).mul_(1.0 / self.denominator)
        out.square_().neg_().exp_()
        return z, inv_std

    def expand_into(self, x: Tensor, out: Tensor) -> None:
        if self.input_norm == "channel_layer":
            out.copy_(self(x))
        else:
            self._rbf_into(x, out)

    def expand_with_vjp(self, x: Tensor, out: Tensor, params: list[Tensor]
                        ) -> Callable[[Tensor], tuple[Tensor, list[Tensor]]] | None:
        if self.input_norm == "channel_layer":
            return None  # autograd differentiates forward()
        z, inv_std = self._rbf_into(x, out)

        def vjp(grad: Tensor) -> tuple[Tensor, list[Tensor]]:
            # dphi_j/dz = -2 (z - g_j) / h^2 phi_j, so grad_z = -2/h^2 (z S1 - S2) with
            # S1 = sum_j G_j phi_j and S2 = sum_j g_j G_j phi_j; then instance norm's VJP
            weighted = grad * out
            grad_z = (z * weighted.sum(2)).sub_((weighted * self.grid(x)).sum(2))
            grad_z.mul_(-2.0 / self.denominator**2)
            dims = tuple(range(2, x.dim()))
            projection = (grad_z * z).mean(dims, keepdim=True)
            grad_x = grad_z.sub_(grad_z.mean(dims, keepdim=True)).sub_(z * projection)
            return grad_x.mul_(inv_std), []

        return vjp


@register_basis("kan")
class BSplineBasis(Basis):
    """B-splines of order ``spline_order`` on a uniform grid of ``grid_size`` intervals.

    The knot vector extends ``grid_range`` by ``spline_order`` intervals on each side, giving
    ``grid_size + spline_order`` basis functions, as torch-conv-kan's KAN convolution (base
    activation GELU and output PReLU by default, as there). Only the ``spline_order + 1``
    splines that are non-zero on a point's knot interval are evaluated (the Cox-de Boor
    recursion in the interval's local coordinate) and scattered into place.
    """

    layer_defaults = {"base_activation": "gelu", "activation": "prelu"}

    def __init__(self, in_channels: int, kernel_numel: int = 9, grid_size: int = 5,
                 spline_order: int = 3, grid_range: Sequence[float] = (-1.0, 1.0)):
        super().__init__()
        lo, hi = _check_grid(grid_size, grid_range)
        self.order = _check_degree(spline_order, "spline_order")
        self.n_basis = grid_size + spline_order
        self.spacing = (hi - lo) / grid_size
        self.first_knot = lo - self.spacing * spline_order

    def forward(self, x: Tensor) -> Tensor:
        k, n = self.order, self.n_basis
        u = (x - self.first_knot) / self.spacing  # knot intervals: [0, n + k)
        cell = torch.floor(u)
        f = u - cell
        local = [torch.ones_like(f)]  # local[r] = B-spline number cell - p + r
        for p in range(1, k + 1):
            local = [((f + (p - r)) * local[r - 1] if r > 0 else 0.0)
                     + ((r + 1 - f) * local[r] if r < p else 0.0) for r in range(p + 1)]
            local = [value / p for value in local]
        inside = ((u >= 0) & (u < n + k)).to(x.dtype).unsqueeze(2)
        spatial = (1,) * (x.dim() - 2)
        offsets = torch.arange(k + 1, device=x.device).view((1, 1, k + 1) + spatial)
        index = cell.clamp(0, n + k - 1).long().unsqueeze(2) + offsets  # = spline number + k
        padded = x.new_zeros((x.shape[0], x.shape[1], n + 2 * k) + tuple(x.shape[2:]))
        return padded.scatter(2, index, torch.stack(local, dim=2) * inside)[:, :, k:k + n]


def _mexican_hat(z: Tensor) -> Tensor:
    return (2.0 / (math.sqrt(3.0) * math.pi**0.25)) * (z.square() - 1.0) * torch.exp(-0.5 * z.square())


def _morlet(z: Tensor) -> Tensor:
    return torch.cos(5.0 * z) * torch.exp(-0.5 * z.square())


def _dog(z: Tensor) -> Tensor:
    return -z * torch.exp(-0.5 * z.square())


def _meyer(z: Tensor) -> Tensor:
    v = z.abs()
    u = (2.0 * v - 1.0).clamp(0.0, 1.0)  # clamped so that large |z| cannot overflow
    nu = u**4 * (35.0 - 84.0 * u + 70.0 * u.square() - 20.0 * u**3)
    window = torch.where(v >= 1.0, torch.zeros_like(v), torch.cos(0.5 * math.pi * nu))
    return torch.sin(math.pi * v) * window


def _sinc(z: Tensor) -> Tensor:
    return torch.sinc(z / math.pi)  # sin(z) / z


WAVELETS: dict[str, Callable[[Tensor], Tensor]] = {
    "mexican_hat": _mexican_hat, "morlet": _morlet, "dog": _dog, "meyer": _meyer,
    "shannon": _sinc,  # times the channel window of WaveletBasis
}


@register_basis("wavkan")
class WaveletBasis(Basis):
    """``n_wavelets`` wavelets psi((x - t_cj) / s_cj) per channel with learnable scale/shift.

    torch-conv-kan's WavKAN learns one (scale, translation) per (output, input) pair; here each
    input channel has a bank of ``n_wavelets`` that every output mixes through the conv weight,
    which keeps the one-conv core. With one wavelet per output (``n_wavelets`` = output channels
    per group) a WavKAN layer is represented exactly (``kanseg.models.convert_wavkan``).
    Wavelet formulas are the same. ``shannon`` is WavKAN's windowed sinc: sin(z) / z times a
    symmetric Hamming window laid over the input channels of a group (WavKAN windows its
    wavelet tensor's input-channel axis), so channel c of C gets
    0.54 - 0.46 cos(2 pi c / (C - 1)). Translations start evenly spread over [-1, 1], scales
    at 1. Base branch SiLU, batch norm and no activation by default. The groups of a grouped
    layer share the scales and translations; with ``wavelet_groups`` (a divisor of the layer's
    ``groups``) ``scale`` and ``translation`` are ``(wavelet_groups * in_channels,
    n_wavelets)`` and channel ``c`` of group ``g`` uses row
    ``(g % wavelet_groups) * in_channels + c`` (``wavelet_groups = groups``: each group its
    own, as WavKAN's grouped convs).
    """

    layer_defaults = {"norm": "batch", "activation": None}

    def __init__(self, in_channels: int, kernel_numel: int = 9, wavelet: str = "mexican_hat",
                 n_wavelets: int = 4, wavelet_groups: int = 1):
        super().__init__()
        if wavelet not in WAVELETS:
            raise ValueError(f"wavelet must be one of {sorted(WAVELETS)}, got {wavelet!r}")
        if isinstance(n_wavelets, bool) or not isinstance(n_wavelets, int) or n_wavelets < 1:
            raise ValueError(f"n_wavelets must be an integer >= 1, got {n_wavelets!r}")
        if (isinstance(wavelet_groups, bool) or not isinstance(wavelet_groups, int)
                or wavelet_groups < 1):
            raise OptionError("wavelet_groups",
                              f"wavelet_groups must be an integer >= 1, got {wavelet_groups!r}")
        self.wavelet = wavelet
        self.n_basis = n_wavelets
        self.in_channels = in_channels
        shift = torch.linspace(-1.0, 1.0, n_wavelets) if n_wavelets > 1 else torch.zeros(1)
        rows = wavelet_groups * in_channels
        self.translation = nn.Parameter(shift.repeat(rows, 1))
        self.scale = nn.Parameter(torch.ones(rows, n_wavelets))

    def forward(self, x: Tensor) -> Tensor:
        shift = _channel_param(self.translation, x).to(x.dtype)
        scale = _channel_param(self.scale, x).to(x.dtype)
        psi = WAVELETS[self.wavelet]((x.unsqueeze(2) - shift) / scale)
        if self.wavelet == "shannon":
            window = torch.hamming_window(self.in_channels, periodic=False, dtype=x.dtype,
                                          device=x.device)
            psi = psi * _channel_param(window.unsqueeze(1), x)
        return psi


@register_basis("relukan")
class ReLUBumpBasis(Basis):
    """ReLU-KAN bumps (r * relu(x - a_j) * relu(b_j - x))^2 with per-channel phases a, b.

    ``grid_size + order`` bumps; a_j = (j - order) / grid_size, b_j = a_j + (order + 1) /
    grid_size, r = 4 grid_size^2 / (order + 1)^2 so that each bump peaks at 1 (torch-conv-kan's
    ``g``, ``k`` and ``train_ab``).
    """

    def __init__(self, in_channels: int, kernel_numel: int = 9, grid_size: int = 5,
                 order: int = 3, train_phases: bool = True):
        super().__init__()
        _check_grid(grid_size, (0.0, 1.0))
        self.order = _check_degree(order, "order")
        self.n_basis = grid_size + order
        self.scale = 4.0 * grid_size**2 / (order + 1) ** 2
        low = torch.arange(-order, grid_size, dtype=torch.float32) / grid_size
        self.phase_low = nn.Parameter(low.repeat(in_channels, 1), requires_grad=train_phases)
        self.phase_high = nn.Parameter((low + (order + 1) / grid_size).repeat(in_channels, 1),
                                       requires_grad=train_phases)

    def forward(self, x: Tensor) -> Tensor:
        xu = x.unsqueeze(2)
        low = _channel_param(self.phase_low, x).to(x.dtype)
        high = _channel_param(self.phase_high, x).to(x.dtype)
        return (self.scale * F.relu(xu - low) * F.relu(high - xu)).square()



def basis_class(family: str) -> type[Basis]:
    """The registered class of ``family``; ValueError listing the families if unknown."""
    if family not in BASIS_REGISTRY:
        raise OptionError("family",
                          f"family must be one of {sorted(BASIS_REGISTRY)}, got {family!r}")
    return BASIS_REGISTRY[family]


def create_basis(family: str, in_channels: int, kernel_numel: int, **options) -> Basis:
    """Build a registered basis family by name."""
    cls = basis_class(family)
    try:
        return cls(in_channels=in_channels, kernel_numel=kernel_numel, **options)
    except TypeError as err:
        raise ValueError(f"invalid option for KAN family {family!r}: {err}") from None


__all__ = [
    "BASIS_REGISTRY", "OUTPUT_ACTIVATIONS", "RBF_INPUT_NORMS", "WAVELETS", "Basis",
    "BernsteinBasis", "BSplineBasis", "ChebyshevBasis", "GaussianRBFBasis", "GramBasis",
    "JacobiBasis", "LegendreBasis", "PolynomialBasis",
    "RecurrenceBasis",
    "ReLUBumpBasis",
    "WaveletBasis", "basis_class", "create_basis", "register_basis",
]
