"""``convert_torch_conv_kan``: a torch-conv-kan layer instance -> this project's equivalent,
with the same weights (eval-mode outputs match; see ``tests/test_models_convert.py``).

Covered: the polynomial KAN convolutions of ``kan_convs/`` (KAGN, KALN, KAJN, KACN; 1D/2D/3D,
groups, instance or batch norm, affine or not) and the ``kans/`` linear layers GRAMLayer,
KALNLayer and ChebyKANLayer. Anything else is refused with the list of what is covered.
torch-conv-kan keeps one module per group and stacks polynomials degree-major
(``d * in_g + c``); ours keeps one tensor per weight, channel-major (``c * n_basis + d``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from kanseg.layers import KANConv, KANLinear, create_kan_conv

from .torch_conv_kan import degree_major_to_channel_major

#: torch-conv-kan conv base class -> our family
_CONV_FAMILIES = {"KAGNConvNDLayer": "kagn", "KALNConvNDLayer": "kaln",
                  "KAJNConvNDLayer": "kajn", "KACNConvNDLayer": "kacn"}


def _norm_option(norm: nn.Module, where: str) -> tuple[str, bool]:
    """(norm name, affine) of one of torch-conv-kan's per-group norm modules."""
    if isinstance(norm, _InstanceNorm):
        if norm.track_running_stats:
            raise ValueError(f"{where}: instance norm with running stats is not supported")
        return "instance", norm.affine
    if isinstance(norm, _BatchNorm):
        return "batch", norm.affine
    raise ValueError(f"{where}: norm {type(norm).__name__} is not supported "
                     "(instance or batch norm are)")


def _grouped_norm_state(norms: nn.ModuleList) -> dict[str, Tensor]:
    """One norm's state from per-group norms (channels concatenated)."""
    states = [n.state_dict() for n in norms]
    return {key: states[0][key] if key == "num_batches_tracked"
            else torch.cat([s[key] for s in states]) for key in states[0]}


def _convert_conv(module: nn.Module, family: str) -> KANConv:
    name = type(module).__name__
    norm, affine = _norm_option(module.layer_norm[0], name)
    options = dict(degree=module.degree, norm=norm, affine=affine,
                   dropout=module.dropout.p if module.dropout is not None else 0.0)
    if family == "kajn":
        options.update(alpha=module.a, beta=module.b)
    groups = module.groups
    ours = create_kan_conv(family, module.ndim, module.inputdim, module.outdim,
                           module.kernel_size, stride=module.stride, padding=module.padding,
                           dilation=module.dilation, groups=groups, **options)
    n_basis = ours.basis.n_basis
    if family == "kacn":  # per-group convs over the channel-major stack already
        basis = torch.cat([conv.weight for conv in module.poly_conv])
    else:
        basis = torch.cat([degree_major_to_channel_major(w, n_basis)
                           for w in module.poly_weights])
    state = {"basis_weight": basis}
    if ours.base_weight is not None:
        state["base_weight"] = torch.cat([conv.weight for conv in module.base_conv])
    if family == "kagn":
        state["basis.beta_weights"] = module.beta_weights
    state.update({f"norm.{k}": v for k, v in _grouped_norm_state(module.layer_norm).items()})
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return ours


def _convert_gram_linear(module: nn.Module) -> KANLinear:
    ours = KANLinear("kagn", module.in_channels, module.out_channels, degree=module.degrees)
    ours.layer.load_state_dict({
        "base_weight": module.base_weights.unsqueeze(-1),
        # theirs (in, out, degree + 1) -> ours (out, in * (degree + 1)), channel-major
        "basis_weight": module.grams_basis_weights.permute(1, 0, 2)
        .reshape(module.out_channels, -1, 1),
        "basis.beta_weights": module.beta_weights,
        "norm.weight": module.norm.weight, "norm.bias": module.norm.bias,
    })
    return ours


def _convert_legendre_linear(module: nn.Module) -> KANLinear:
    ours = KANLinear("kaln", module.input_features, module.output_features,
                     degree=module.polynomial_order, base_activation="silu")
    ours.layer.load_state_dict({
        "base_weight": module.base_weight.unsqueeze(-1),
        "basis_weight": module.poly_weight.unsqueeze(-1),  # (out, in * (d + 1)), channel-major
        "norm.weight": module.layer_norm.weight, "norm.bias": module.layer_norm.bias,
    })
    return ours


def _convert_chebyshev_linear(module: nn.Module) -> KANLinear:
    ours = KANLinear("kacn", module.inputdim, module.outdim, degree=module.degree, norm="none")
    ours.layer.load_state_dict({"basis_weight": module.cheby_coeffs.permute(1, 0, 2)
                                .reshape(module.outdim, -1, 1)})
    return ours


_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    **{cls: (lambda m, f=family: _convert_conv(m, f)) for cls, family in _CONV_FAMILIES.items()},
    "GRAMLayer": _convert_gram_linear,
    "KALNLayer": _convert_legendre_linear,
    "ChebyKANLayer": _convert_chebyshev_linear,
}


def convert_torch_conv_kan(module: nn.Module) -> nn.Module:
    """This project's equivalent of a torch-conv-kan layer, with the same weights and the same
    train/eval mode. ValueError naming the class and the covered classes otherwise."""
    for cls in type(module).__mro__:
        if cls.__name__ in _CONVERTERS:
            with torch.no_grad():
                converted = _CONVERTERS[cls.__name__](module)
            return converted.train(module.training)
    raise ValueError(f"{type(module).__name__}: no conversion; covered torch-conv-kan classes: "
                     f"{', '.join(sorted(_CONVERTERS))} (and their 1D/2D/3D subclasses)")
