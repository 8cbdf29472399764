"""``convert_torch_conv_kan``: a torch-conv-kan layer instance -> this project's equivalent,
with the same weights (eval-mode outputs match; see ``tests/test_models_convert.py``).

Covered: the KAN convolutions of ``kan_convs/`` for KAGN (plain and bottleneck), KALN, KAJN,
KACN (1D/2D/3D, groups, instance or batch norm, affine or not), FastKAN (its default input
norm), KAN B-splines (equal per-group PReLUs) and ReLU-KAN; the ``kans/`` linear layers
GRAMLayer (any ``act``: our Gram basis's ``basis_activation``), BottleNeckGRAMLayer (a
bottleneck :class:`KANLinear` with ``projection_bias``), KALNLayer, ChebyKANLayer,
JacobiKANLayer, KANLayer, FastKANLayer (its LayerNorm across features: the fastkan basis's
``input_norm="channel_layer"``; its base bias: :class:`KANLinear`'s) and ReLUKANLayer (no base
branch: ours is zeroed; its bias is :class:`KANLinear`'s), and the networks built from them
(KAGN, BottleNeckKAGN, KALN, KACN, KAJN, KAN, FastKAN, ReLUKAN). Anything else is refused
with the list of what is covered. WavKAN convs (grouped ones whatever their groups'
wavelets), WavKANLayer and WavKAN: see :mod:`kanseg.models.convert_wavkan`.
Networks DenseKANet and TinyDenseKANet (their MoE BN variants included), ResKANet,
MoEResKANet (any ``width_per_group``, dilation and hidden layer; the ``reskagnetbn_moe_*``
included), KAGNRDNet (``post_block_attention`` included), U2KANet and U2KANetSmall
(``u2kagnet_bn_small`` included): see :mod:`kanseg.models.convert_models`. MoE convs: see
:mod:`kanseg.models.convert_moe`. Attention and focal-modulation layers, KAGN V2 and bottleneck
ReLU-KAN convs, UKANet and UKAGNet: see :mod:`kanseg.models.convert_attention`.
VGGs of KAGN or KALN convs (VGGKAGN, VGGKAGN_BN, MoEVGGKAGN, MoE_VGGKAGN_BN, VGGKALN): see
:func:`kanseg.models.convert_models.convert_vgg`, which maps their weights as
``load_torch_conv_kan`` maps their checkpoints; the other VGGs of torch-conv-kan are refused.
The huggingface-hub wrappers AutoKAN and TinyAutoKAGN (not modules) convert their ``model``.
torch-conv-kan keeps one module per group and stacks polynomials degree-major
(``d * in_g + c``); ours keeps one tensor per weight, channel-major (``c * n_basis + d``).

Documented exceptions (no conversion; ``tests/test_convert_coverage.py`` holds the same list):

- KABN: KABNConvNDLayer (KABNConv1DLayer, KABNConv2DLayer, KABNConv3DLayer), BernsteinKANLayer
  and KABN. torch-conv-kan's Bernstein basis is all ones; ours is the Bernstein basis it
  intends.
- The MNIST / CIFAR baselines of ``models/baselines`` (SimpleConv, SimpleConvKAN,
  SimpleFastConvKAN, SimpleConvKALN, SimpleConvKACN, SimpleConvKAGN, SimpleMoEConvKAGNBN,
  SimpleConvWavKAN and their EightSimple* versions): no network here has their layout.
- Parts of other layers and networks, not converted alone: RadialBasisFunction (FastKAN's
  basis), SplineLinear (FastKANLayer's weight), WaveletConvND, WaveletConvNDFast and
  WaveletConvNDFastPlusOne (WavKAN convs), KAGNExpert, KAGNMoE and SparseDispatcher (MoE
  convs), the dense layers, blocks and transitions of ``models/densekanet.py``, the blocks of
  ``models/reskanet.py`` and ``models/kan_rdnet.py``, and ResidualUNetBase /
  ResidualUNetBaseF (U2KANet's RSU blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from kanseg.layers import ACTIVATIONS, KANConv, KANLinear, create_kan_conv

from .convert_wavkan import convert_wavkan_conv, convert_wavkan_linear
from .convert_models import NETWORK_CONVERTERS
from .convert_moe import MOE_CONVERTERS
from .convert_attention import ATTENTION_CONVERTERS
from .torch_conv_kan import layer_state_to_ours, norm_state_to_ours

#: torch-conv-kan conv base class -> our family
CONV_FAMILIES = {"KAGNConvNDLayer": "kagn", "BottleNeckKAGNConvNDLayer": "kagn",
                 "KALNConvNDLayer": "kaln", "KAJNConvNDLayer": "kajn", "KACNConvNDLayer": "kacn"}


def norm_option(norm: nn.Module, where: str) -> tuple[str, bool]:
    """(norm name, affine) of one of torch-conv-kan's per-group norm modules."""
    if isinstance(norm, _InstanceNorm):
        if norm.track_running_stats:
            raise ValueError(f"{where}: instance norm with running stats is not supported")
        return "instance", norm.affine
    if isinstance(norm, _BatchNorm):
        return "batch", norm.affine
    raise ValueError(f"{where}: norm {type(norm).__name__} is not supported "
                     "(instance or batch norm are)")


def dropout_of(module: nn.Module) -> float:
    return module.dropout.p if module.dropout is not None else 0.0


def _convert_polynomial(module: nn.Module, family: str) -> nn.Module:
    """KAGN (plain or bottleneck), KALN, KAJN and KACN convs."""
    name = type(module).__name__
    norm, affine = norm_option(module.layer_norm[0], name)
    options = dict(degree=module.degree, norm=norm, affine=affine, dropout=dropout_of(module))
    if family == "kajn":
        options.update(alpha=module.a, beta=module.b)
    if hasattr(module, "inner_dim"):  # bottleneck: reproduce its inner width exactly
        widest = max(module.inputdim, module.outdim) // module.groups
        options.update(bottleneck=True, dim_reduction=widest / (module.inner_dim + 0.5),
                       min_internal=0)
    ours = create_kan_conv(family, module.ndim, module.inputdim, module.outdim,
                           module.kernel_size, **conv_geometry(module), **options)
    if family == "kacn":  # per-group convs over the channel-major stack already
        state = {"basis_weight": torch.cat([conv.weight for conv in module.poly_conv])}
        state.update(norm_state_to_ours(module.state_dict(), module.groups))
    else:
        state = layer_state_to_ours(module.state_dict(), ours, module.groups)
    ours.load_state_dict(state)
    return ours


def activation_name(module: nn.Module, where: str) -> str:
    """Our name of a parameter-free activation module (SiLU, GELU, ReLU, identity)."""
    for name, cls in ACTIVATIONS.items():
        if type(module) is cls and name != "prelu":
            return name
    raise ValueError(f"{where}: activation {type(module).__name__} is not supported")


def conv_geometry(module: nn.Module) -> dict:
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups)


def _spline_state(module: nn.Module) -> dict[str, Tensor]:
    """Base and basis weights of torch-conv-kan's FastKAN / KAN convs (channel-major already)."""
    return {"base_weight": torch.cat([conv.weight for conv in module.base_conv]),
            "basis_weight": torch.cat([conv.weight for conv in module.spline_conv])}


def _rbf_options(rbf: nn.Module, where: str) -> dict:
    """Our fastkan basis options for torch-conv-kan's ``RadialBasisFunction`` (evenly spaced
    grid)."""
    grid = rbf.grid.detach()
    lo, hi = float(grid[0]), float(grid[-1])
    if not torch.allclose(grid, torch.linspace(lo, hi, grid.numel(), dtype=grid.dtype)):
        raise ValueError(f"{where}: the RBF grid is not evenly spaced ({grid.tolist()})")
    return dict(grid_size=grid.numel(), grid_range=(lo, hi), denominator=rbf.denominator)


def _convert_fastkan(module: nn.Module) -> KANConv:
    """FastKAN: the input norm must be torch-conv-kan's default (instance norm, no affine), which
    is the normalisation our Gaussian RBF basis applies."""
    name = type(module).__name__
    norm = module.layer_norm[0]
    if not isinstance(norm, _InstanceNorm) or norm.affine or norm.track_running_stats:
        raise ValueError(f"{name}: only the default input norm (instance norm without affine) "
                         f"converts, got {norm}")
    ours = create_kan_conv(
        "fastkan", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **conv_geometry(module), **_rbf_options(module.rbf, name), eps=norm.eps,
        base_activation=activation_name(module.base_activation, name),
        dropout=dropout_of(module))
    ours.load_state_dict(_spline_state(module))
    return ours


def _convert_bspline(module: nn.Module) -> KANConv:
    """KAN (B-spline) conv: one PReLU per group there, one per layer here, so the groups'
    slopes must be equal."""
    name = type(module).__name__
    slopes = torch.cat([prelu.weight for prelu in module.prelus])
    if slopes.numel() != len(module.prelus) or not torch.all(slopes == slopes[0]):
        raise ValueError(f"{name}: the per-group PReLU slopes differ ({slopes.tolist()}); "
                         "only equal single-slope PReLUs convert")
    norm, affine = norm_option(module.layer_norm[0], name)
    ours = create_kan_conv(
        "kan", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **conv_geometry(module), grid_size=module.grid_size, spline_order=module.spline_order,
        grid_range=tuple(module.grid_range), norm=norm, affine=affine,
        base_activation=activation_name(module.base_activation, name),
        dropout=dropout_of(module))
    state = _spline_state(module)
    state["act.weight"] = slopes[:1]
    state.update(norm_state_to_ours(module.state_dict(), module.groups))
    ours.load_state_dict(state)
    return ours


def _convert_relukan(module: nn.Module) -> KANConv:
    name = type(module).__name__
    norm, affine = norm_option(module.layer_norm[0], name)
    ours = create_kan_conv(
        "relukan", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **conv_geometry(module), grid_size=module.g, order=module.k, train_phases=module.train_ab,
        norm=norm, affine=affine, dropout=dropout_of(module))
    in_per_group = module.inputdim // module.groups
    state = {"base_weight": torch.cat([conv.weight for conv in module.base_conv]),
             "basis_weight": torch.cat([conv.weight for conv in module.relukan_conv]),
             "basis.phase_low": module.phase_low.reshape(in_per_group, -1),
             "basis.phase_high": module.phase_high.reshape(in_per_group, -1)}
    state.update(norm_state_to_ours(module.state_dict(), module.groups))
    ours.load_state_dict(state)
    return ours


@dataclass(frozen=True)
class _LinearSpec:
    """Where a ``kans/`` linear layer keeps what our :class:`KANLinear` needs."""

    family: str
    sizes: tuple[str, str]  # attributes holding in and out features
    coefficients: str  # basis weight: (in, out, n) unless ``layout`` says otherwise
    layout: str = "in_out_n"  # or "out_in_n", or "flat" (out, in * n), channel-major
    target: str = "basis_weight"  # our name of the basis weight
    base: str | None = None  # (out, in) base weight; None: no base branch (ours is zeroed)
    norm: str | None = None  # the output LayerNorm
    bias: str | None = None  # the output bias
    options: Callable[[nn.Module], dict] = lambda module: {}
    extra_state: Callable[[nn.Module], dict] = lambda module: {}


def _gram_options(module: nn.Module) -> dict:
    """GRAMLayer / BottleNeckGRAMLayer apply their ``act`` to the base input, the basis and the
    output (``mlp_kagn`` defaults to GELU)."""
    act = activation_name(module.act, type(module).__name__)
    return {"degree": module.degrees, "base_activation": act, "activation": act,
            "basis_activation": act}


def _bottleneck_gram_options(module: nn.Module) -> dict:
    """BottleNeckGRAMLayer: our bottleneck, with biased projections, of the same inner width."""
    return {**_gram_options(module), "bottleneck": True, "projection_bias": True,
            "dim_reduction": module.dim_reduction, "min_internal": module.min_internal}


def _bottleneck_gram_state(module: nn.Module) -> dict[str, Tensor]:
    """BottleNeckGRAMLayer's recurrence weights and its linear projections as our 1x1 convs."""
    state = {"core.basis.beta_weights": module.beta_weights}
    for ours, theirs in (("inner_proj", module.inner_proj), ("out_proj", module.outer_proj)):
        state.update({f"{ours}.weight": theirs.weight.unsqueeze(-1), f"{ours}.bias": theirs.bias})
    return state


def _legendre_options(module: nn.Module) -> dict:
    """KALNLayer: its ``base_activation`` acts on the base input and on the output."""
    name = activation_name(module.base_activation, "KALNLayer")
    return {"degree": module.polynomial_order, "base_activation": name, "activation": name}


_LINEAR_SPECS = {
    "GRAMLayer": _LinearSpec(
        "kagn", ("in_channels", "out_channels"), "grams_basis_weights", base="base_weights",
        norm="norm", options=_gram_options,
        extra_state=lambda m: {"basis.beta_weights": m.beta_weights}),
    # its Gram layer maps the inner width to itself, between biased projections
    "BottleNeckGRAMLayer": _LinearSpec(
        "kagn", ("in_channels", "out_channels"), "grams_basis_weights", base="base_weights",
        norm="norm", target="core.basis_weight", options=_bottleneck_gram_options,
        extra_state=_bottleneck_gram_state),
    "KALNLayer": _LinearSpec(
        "kaln", ("input_features", "output_features"), "poly_weight", layout="flat",
        base="base_weight", norm="layer_norm",
        options=_legendre_options),
    "ChebyKANLayer": _LinearSpec(
        "kacn", ("inputdim", "outdim"), "cheby_coeffs",
        options=lambda m: {"degree": m.degree, "norm": "none"}),
    "JacobiKANLayer": _LinearSpec(
        "kajn", ("inputdim", "outdim"), "jacobi_coeffs", base="base_weights", norm="norm",
        options=lambda m: {"degree": m.degree, "alpha": m.a, "beta": m.b,
                           "base_activation": "silu"}),
    "KANLayer": _LinearSpec(
        "kan", ("input_features", "output_features"), "spline_weight", layout="out_in_n",
        base="base_weight", norm="layer_norm",
        options=lambda m: {"grid_size": m.grid_size, "spline_order": m.spline_order,
                           "grid_range": tuple(m.grid_range),
                           "base_activation": activation_name(m.base_activation, "KANLayer")},
        extra_state=lambda m: {"act.weight": m.prelu.weight}),
    # its forward reshapes the (in, n) bumps to (n, in) without transposing them, so its conv
    # weight (out, 1, n, in) flattens to the channel-major order
    "ReLUKANLayer": _LinearSpec(
        "relukan", ("input_size", "output_size"), "equal_size_conv.weight", layout="flat",
        bias="equal_size_conv.bias",
        options=lambda m: {"grid_size": m.g, "order": m.k, "norm": "none", "activation": None,
                           "train_phases": m.phase_low.requires_grad},
        extra_state=lambda m: {"basis.phase_low": m.phase_low,
                               "basis.phase_high": m.phase_high}),
}


def _convert_linear(module: nn.Module, spec: _LinearSpec) -> KANLinear:
    in_features, out_features = (getattr(module, name) for name in spec.sizes)
    ours = KANLinear(spec.family, in_features, out_features, bias=spec.bias is not None,
                     **spec.options(module))
    weight = module.get_parameter(spec.coefficients)
    if spec.layout == "in_out_n":
        weight = weight.permute(1, 0, 2)
    state = {spec.target: weight.reshape(weight.shape[0], -1, 1), **spec.extra_state(module)}
    if spec.base is not None:
        state["base_weight"] = module.get_parameter(spec.base).unsqueeze(-1)
    elif ours.layer.base_weight is not None:
        state["base_weight"] = torch.zeros_like(ours.layer.base_weight)
    if spec.norm is not None:
        norm = getattr(module, spec.norm)
        state.update({"norm.weight": norm.weight, "norm.bias": norm.bias})
    ours.layer.load_state_dict(state)
    if spec.bias is not None:
        ours.bias.copy_(module.get_parameter(spec.bias))
    return ours


def _convert_fastkan_linear(module: nn.Module) -> KANLinear:
    """FastKANLayer: a LayerNorm across the features before the RBF (our fastkan basis's
    ``input_norm="channel_layer"``) and, with ``use_base_update``, a biased linear base branch
    (our output bias; without it, ours is zeroed)."""
    name = type(module).__name__
    norm, base = module.layernorm, getattr(module, "base_linear", None)
    activation = activation_name(module.base_activation, name) if base is not None else "silu"
    ours = KANLinear("fastkan", norm.normalized_shape[0], module.spline_linear.out_features,
                     bias=base is not None, **_rbf_options(module.rbf, name), eps=norm.eps,
                     base_activation=activation)
    state = {"basis_weight": module.spline_linear.weight.unsqueeze(-1),
             "base_weight": (base.weight.unsqueeze(-1) if base is not None
                             else torch.zeros_like(ours.layer.base_weight)),
             "basis.layer_norm.weight": norm.weight, "basis.layer_norm.bias": norm.bias}
    ours.layer.load_state_dict(state)
    if base is not None:
        ours.bias.copy_(base.bias)
    return ours


def _convert_mlp(module: nn.Module) -> nn.Sequential:
    """A ``kans/`` network (KAGN, BottleNeckKAGN, KALN, KACN, KAJN, KAN, FastKAN, ReLUKAN): its
    layers converted one by one, dropouts kept, L1 wrappers unwrapped (they only act on
    gradients)."""
    parts: list[nn.Module] = []
    for layer in module.layers:
        if isinstance(layer, nn.Dropout):
            parts.append(nn.Dropout(layer.p))
        else:
            parts.append(convert_torch_conv_kan(getattr(layer, "module", layer)))
    return nn.Sequential(*parts)


def _convert_hub_wrapper(module: nn.Module) -> nn.Module:
    """``AutoKAN`` / ``TinyAutoKAGN``: huggingface-hub wrappers (not modules) of the network in
    their ``model``."""
    return convert_torch_conv_kan(module.model)


_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    **{cls: (lambda m, f=family: _convert_polynomial(m, f)) for cls, family in CONV_FAMILIES.items()},
    "FastKANConvNDLayer": _convert_fastkan,
    "KANConvNDLayer": _convert_bspline,
    "ReLUConvNDLayer": _convert_relukan,
    **{cls: (lambda m, spec=spec: _convert_linear(m, spec)) for cls, spec in _LINEAR_SPECS.items()},
    "FastKANLayer": _convert_fastkan_linear,
    **{cls: _convert_mlp for cls in ("KAGN", "BottleNeckKAGN", "KALN", "KACN", "KAJN", "KAN",
                                     "FastKAN", "ReLUKAN")},
    "WavKANConvNDLayer": convert_wavkan_conv, "WavKANLayer": convert_wavkan_linear,
    "WavKAN": _convert_mlp,
    **NETWORK_CONVERTERS,
    **MOE_CONVERTERS,
    **ATTENTION_CONVERTERS,
    "AutoKAN": _convert_hub_wrapper, "TinyAutoKAGN": _convert_hub_wrapper,
}


_KABN = ("torch-conv-kan's Bernstein basis is all ones; ours is the Bernstein basis it "
         "intends")
#: torch-conv-kan classes refused, with the reason (the module docstring's exceptions)
_REFUSED = {"KABNConvNDLayer": _KABN, "BernsteinKANLayer": _KABN, "KABN": _KABN}


def convert_torch_conv_kan(module: nn.Module) -> nn.Module:
    """This project's equivalent of a torch-conv-kan layer, with the same weights and the same
    train/eval mode. ValueError naming the class and the reason (documented exceptions) or the
    covered classes otherwise."""
    for cls in type(module).__mro__:
        if cls.__name__ in _CONVERTERS:
            with torch.no_grad():
                converted = _CONVERTERS[cls.__name__](module)
            # hub wrappers have no mode of their own: their network's, converted already
            return converted.train(getattr(module, "training", converted.training))
        if cls.__name__ in _REFUSED:
            raise ValueError(f"{type(module).__name__}: no conversion: {_REFUSED[cls.__name__]}")
    raise ValueError(f"{type(module).__name__}: no conversion; covered torch-conv-kan classes: "
                     f"{', '.join(sorted(_CONVERTERS))} (and their 1D/2D/3D subclasses)")
