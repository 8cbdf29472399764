"""Basis-coefficient adapter for one KAN layer (plain or bottleneck), any polynomial family."""
from __future__ import annotations

import copy
import inspect
import itertools
from math import prod

import torch
from torch import Tensor, nn

from kanseg.layers import Basis

from ..common import basis_conv, basis_prefix
from ..tuner import AdapterLayer
from .config import BasisConfig


def extend_basis(basis: Basis, extra: int, in_channels: int, kernel_numel: int) -> Basis:
    """A copy of ``basis`` with ``extra`` more degrees whose first ``n_basis`` functions are
    unchanged; parameters are copied and their new entries set to 0.

    The constructor is called with the options stored on the basis under the constructor's
    argument names; the result is checked numerically, so a family whose low-degree functions
    depend on the degree (or that does not store its options) is refused with a clear error.
    """
    cls = type(basis)
    kwargs = {}
    for name, arg in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
            continue
        if name == "degree":
            kwargs[name] = basis.degree + extra
        elif name == "in_channels":
            kwargs[name] = in_channels
        elif name == "kernel_numel":
            kwargs[name] = kernel_numel
        elif hasattr(basis, name):
            kwargs[name] = getattr(basis, name)
        elif arg.default is arg.empty:
            raise ValueError(f"cannot add degrees to family {basis.family!r}: its option {name!r} "
                             "is not stored on the basis")
    like = next(itertools.chain(basis.parameters(), basis.buffers()), torch.empty(0))
    new = cls(**kwargs).to(like.device)
    if new.n_basis != basis.n_basis + extra:
        raise ValueError(f"family {basis.family!r} does not add one function per degree")
    with torch.no_grad():
        for name, param in basis.named_parameters():
            target = new.get_parameter(name)
            if any(t < s for t, s in zip(target.shape, param.shape)) or target.dim() != param.dim():
                raise ValueError(f"cannot add degrees to family {basis.family!r}: parameter {name!r} "
                                 f"{tuple(param.shape)} does not grow to {tuple(target.shape)}")
            target.zero_()
            target[tuple(slice(0, s) for s in param.shape)] = param.to(target)
        probe = torch.linspace(-2.0, 2.0, 33, dtype=torch.float64).expand(1, in_channels, 33)
        old_out = copy.deepcopy(basis).double()(probe)
        new_out = copy.deepcopy(new).double()(probe)[:, :, : basis.n_basis]
    if not torch.allclose(old_out, new_out, atol=1e-9, rtol=1e-7):
        raise ValueError(
            f"family {basis.family!r} cannot take extra degrees: its low-degree functions change "
            "with the degree (use extra_degrees=0)"
        )
    return new


class BasisLayer(AdapterLayer):
    """``base_layer`` with deltas on the basis weights of ``config.degrees``, ``extra_degrees``
    zero-initialised new degrees and deltas on the basis shape parameters."""

    method = "basis"

    def __init__(self, base_layer: nn.Module, config: BasisConfig):
        super().__init__(base_layer, config)
        core = basis_conv(base_layer)
        basis = core.basis
        if basis.degree is None:
            raise ValueError(f"the basis method needs a polynomial family (one basis function per "
                             f"degree); {basis.family!r} is not: use the 'scales' or 'lora' method")
        bad = [d for d in config.degrees if d > basis.degree]
        if bad:
            raise ValueError(f"degrees {bad} exceed the layer's degree {basis.degree}")
        in_pg = core.in_channels // core.groups
        k = core.kernel_size
        self.n_basis = basis.n_basis
        self.register_buffer("delta_index", torch.tensor(sorted(set(config.degrees)), dtype=torch.long),
                             persistent=False)
        zeros = lambda n: nn.Parameter(torch.zeros(core.out_channels, in_pg, n, *k).to(core.basis_weight))  # noqa: E731
        self.basis_delta = zeros(len(self.delta_index)) if len(self.delta_index) else None
        self.extra_weight = zeros(config.extra_degrees) if config.extra_degrees else None
        self.work_basis = (extend_basis(basis, config.extra_degrees, in_pg, prod(k))
                           if config.extra_degrees else None)
        if self.work_basis is not None:
            self.work_basis.requires_grad_(False)
        source = self.work_basis if self.work_basis is not None else basis
        self.shape_delta = nn.ParameterDict({
            name.replace(".", "__"): nn.Parameter(torch.zeros_like(p))
            for name, p in source.named_parameters()
        } if config.train_shape else {})

    def _basis(self) -> Basis:
        return self.work_basis if self.work_basis is not None else basis_conv(self.base_layer).basis

    def effective_basis_params(self) -> dict[str, Tensor]:
        """Basis shape parameters with their deltas added (empty when not trained)."""
        return {name: p + self.shape_delta[name.replace(".", "__")]
                for name, p in self._basis().named_parameters()
                if name.replace(".", "__") in self.shape_delta}

    def effective_basis_weight(self) -> Tensor:
        """Basis weight with the degree deltas added and the extra degrees appended."""
        core = basis_conv(self.base_layer)
        out = core.out_channels
        w = core.basis_weight.view(out, -1, self.n_basis, *core.kernel_size)
        if self.basis_delta is not None:
            w = w.index_add(2, self.delta_index, self.basis_delta)
        if self.extra_weight is not None:
            w = torch.cat([w, self.extra_weight], dim=2)
        return w.flatten(1, 2)

    def substitutions(self) -> tuple[dict[str, Tensor], dict[str, nn.Module]]:
        """The effective basis weight and shape parameters, and the extended basis (if any)."""
        prefix = basis_prefix(self.base_layer)
        tensors = {f"{prefix}basis_weight": self.effective_basis_weight()}
        tensors.update({f"{prefix}basis.{name}": value
                        for name, value in self.effective_basis_params().items()})
        modules = {f"{prefix}basis": self.work_basis} if self.work_basis is not None else {}
        return tensors, modules
