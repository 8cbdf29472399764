"""``convert_torch_conv_kan`` for torch-conv-kan's ``kan_convs/attention_conv.py`` (self-KAN-
attention, its RoPE and bottleneck / ReLU-KAN variants, KAN focal modulation), the convs they
use that ``convert.py`` does not (KAGN V2, bottleneck ReLU-KAN) and ``models/ukanet.py``
(``UKANet``, ``UKAGNet``). Eval-mode outputs match (``tests/test_attention.py``).

A layer is built as ours with the same options, then its KAN convs are replaced by their own
conversions and its plain modules (norms, 1x1 convs) take the reference's state; a network is
built with the same structure and converted module by module (:func:`mirror_into`).

Exceptions: ``BottleNeckSelfReLUKANtention3D`` builds 2D convs under a 3D norm, so the
reference cannot run and is refused. KAGN V2 with ``groups > 1`` (the focal convs) splits the
degree-major stack of all channels into groups, which is no channel grouping of ours: it
converts to an equal dense (``groups=1``) conv whose weight is zero outside V2's groups.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
from torch import nn

from kanseg.layers import KANBottleneckConv, KANConv, create_kan_conv
from kanseg.layers.attention import KANFocalModulation, KANSelfAttention

from .tck_ukanet import TCKUKAGNet, TCKUKANet
from .torch_conv_kan import norm_state_to_ours

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _base() -> ModuleType:
    """``kanseg.models.convert`` (imported here, not at the top: it imports this module)."""
    from . import convert

    return convert


def _convert(module: nn.Module) -> nn.Module:
    return _base().convert_torch_conv_kan(module)


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _copy_norm(ours: nn.Module, theirs: nn.Module) -> None:
    """State, eps and momentum of a torch norm module (ours built with the same kind)."""
    ours.load_state_dict(theirs.state_dict())
    ours.eps = theirs.eps
    if hasattr(theirs, "momentum"):
        ours.momentum = theirs.momentum


def _output_norm(norm: nn.Module, where: str) -> tuple[str, bool]:
    """(name, affine) of an attention output norm: batch / instance, or timm's LayerNorm2d."""
    if isinstance(norm, nn.LayerNorm):
        return "channel_layer", norm.elementwise_affine
    return _base().norm_option(norm, where)


def _bottleneck_options(module: nn.Module) -> dict:
    """Options that reproduce a torch-conv-kan bottleneck conv's inner width exactly."""
    widest = max(module.inputdim, module.outdim) // module.groups
    return dict(bottleneck=True, dim_reduction=widest / (module.inner_dim + 0.5), min_internal=0)


def _convert_kagn_v2(module: nn.Module) -> KANConv:
    """KAGN V2: one grouped conv over the degree-major stack ``d * C + c`` of all channels, as a
    dense KAN conv: output ``o`` of V2 group ``g`` reads stack entries ``g * m + j``."""
    base = _base()
    name = type(module).__name__
    norm, affine = base.norm_option(module.layer_norm, name)
    ours = create_kan_conv(
        "kagn", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **{**base.conv_geometry(module), "groups": 1}, degree=module.degree, norm=norm,
        affine=affine, dropout=base.dropout_of(module))
    channels, n_basis, out = module.inputdim, module.degree + 1, module.outdim
    group = torch.arange(out) // (out // module.groups)

    def dense(weight: torch.Tensor, width: int, index: Callable) -> torch.Tensor:
        per_group = weight.shape[1]
        source = group[:, None] * per_group + torch.arange(per_group)  # (out, per_group)
        target = index(source).view((out, per_group) + (1,) * (weight.dim() - 2))
        full = weight.new_zeros((out, width) + tuple(weight.shape[2:]))
        return full.scatter_(1, target.expand_as(weight), weight)

    state = {
        "base_weight": dense(module.base_conv.weight, channels, lambda s: s),
        "basis_weight": dense(module.poly_conv.weight, channels * n_basis,
                              lambda s: (s % channels) * n_basis + s // channels),
        "basis.beta_weights": module.beta_weights,
        **{f"norm.{k}": v for k, v in module.layer_norm.state_dict().items()},
    }
    ours.load_state_dict(state)
    return ours


def _convert_relukan_bottleneck(module: nn.Module) -> KANBottleneckConv:
    """Bottleneck ReLU-KAN: squeeze, ReLU-KAN conv, expand, plus the full SiLU base branch."""
    base = _base()
    norm, affine = base.norm_option(module.layer_norm[0], type(module).__name__)
    ours = create_kan_conv(
        "relukan", module.ndim, module.inputdim, module.outdim, module.kernel_size,
        **base.conv_geometry(module), grid_size=module.g, order=module.k,
        train_phases=module.train_ab, norm=norm, affine=affine, dropout=base.dropout_of(module),
        **_bottleneck_options(module))
    state = {f"{name}.weight": torch.cat([conv.weight for conv in getattr(module, name)])
             for name in ("inner_proj", "out_proj")}
    state.update({
        "base_weight": torch.cat([conv.weight for conv in module.base_conv]),
        "core.basis_weight": torch.cat([conv.weight for conv in module.relukan_conv]),
        "core.basis.phase_low": module.phase_low.reshape(module.inner_dim, -1),
        "core.basis.phase_high": module.phase_high.reshape(module.inner_dim, -1),
    })
    state.update(norm_state_to_ours(module.state_dict(), module.groups))
    ours.load_state_dict(state)
    return ours


def _convert_self_attention(module: nn.Module) -> KANSelfAttention:
    """SelfKANtentionND and RoPESelfKANtentionND (any convertible q/k/v conv, any dims)."""
    name = type(module).__name__
    convs = {key: _convert(getattr(module, key)) for key in ("proj_q", "proj_k", "proj_v")}
    ref_q = module.proj_q
    kernel, dilation = ref_q.kernel_size, ref_q.dilation
    if ref_q.stride != 1 or ref_q.padding != dilation * (kernel - 1) // 2 or kernel % 2 == 0:
        raise ValueError(f"{name}: q/k/v convs with kernel {kernel}, stride {ref_q.stride}, "
                         f"padding {ref_q.padding} change the size, so x + attention fails")
    norm, affine = _output_norm(module.norm_layer, name)
    rope, theta = None, 10.0
    if hasattr(module, "rope_mixed"):
        rope = "mixed" if module.rope_mixed else "axial"
        theta = module.compute_cis.keywords.get("theta", theta)
    inner = None if module.inner_proj is None else module.inner_proj.out_channels
    ours = KANSelfAttention(
        module.input_dim, module.ndim, convs["proj_q"].basis.family, kernel_size=kernel,
        inner_channels=inner, rope=rope, rope_theta=theta, norm=norm, affine=affine,
        groups=ref_q.groups, dilation=dilation,
        bottleneck=isinstance(convs["proj_q"], KANBottleneckConv))
    if not isinstance(ours.norm_layer, type(module.norm_layer)) and norm != "channel_layer":
        raise ValueError(f"{name}: its convs are {module.ndim}D but its output norm is "
                         f"{type(module.norm_layer).__name__}; the reference cannot run")
    for key, conv in convs.items():
        setattr(ours, key, conv)
    _copy_norm(ours.norm_layer, module.norm_layer)
    if inner is not None:
        ours.inner_proj.load_state_dict(module.inner_proj.state_dict())
        ours.outer_proj.load_state_dict(module.outer_proj.state_dict())
    ours.gamma.copy_(module.gamma)
    if rope == "mixed":
        ours.rope.freqs.copy_(module.freqs.reshape(ours.rope.freqs.shape))
    return ours


def _convert_focal(module: nn.Module) -> KANFocalModulation:
    """KANFocalModulationND (KAGN / bottleneck KAGN, full KAN or plain f and h)."""
    name = type(module).__name__
    proj = _convert(module.proj)
    full_kan = not isinstance(module.f, _PLAIN_CONVS)
    post = module.norm_layer if module.use_postln_in_modulation else None
    post_norm, affine = (None, True) if post is None else _base().norm_option(post, name)
    ours = KANFocalModulation(
        module.dim, module.ndim, proj.basis.family, focal_window=module.focal_window,
        focal_level=module.focal_level, focal_factor=module.focal_factor, post_norm=post_norm,
        normalize_modulator=module.normalize_modulator, full_kan=full_kan, affine=affine,
        bottleneck=isinstance(proj, KANBottleneckConv))
    ours.proj = proj
    for key in ("f", "h"):
        if full_kan:
            setattr(ours, key, _convert(getattr(module, key)))
        else:
            getattr(ours, key).load_state_dict(getattr(module, key).state_dict())
    ours.focal_layers = nn.ModuleList(_convert(layer) for layer in module.focal_layers)
    if post is not None:
        _copy_norm(ours.norm_layer, post)
    return ours


#: torch-conv-kan's residual-block children -> ours (:class:`~.resblocks.ReferenceResBlock`)
_BLOCK_NAMES = {"conv1": "body.0", "conv2": "body.1", "downsample": "shortcut"}


def _counterpart(ours: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent, key) of the submodule of ``ours`` that their child ``name`` maps to."""
    path = name if name in ours._modules else _BLOCK_NAMES.get(name, name)
    *parents, key = path.split(".")
    return (ours.get_submodule(".".join(parents)) if parents else ours), key


def mirror_into(ours: nn.Module, theirs: nn.Module, where: str = "") -> None:
    """Give every submodule of ``ours`` the weights of ``theirs``' same-named one (residual
    blocks: :data:`_BLOCK_NAMES`): torch-conv-kan layers are converted and replace ours, plain
    torch modules load their state. ValueError naming the first part that does not match."""
    for name, child in theirs.named_children():
        path = f"{where}{name}"
        if type(child).__name__ == "L1":  # torch-conv-kan's L1 wrapper acts on gradients only
            child = child.module
        try:
            parent, key = _counterpart(ours, name)
        except AttributeError:
            parent, key = ours, name
        mine = parent._modules.get(key)
        if mine is None:
            raise ValueError(f"{path}: {type(child).__name__} has no counterpart in "
                             f"{type(ours).__name__}")
        if _class_names(child) & set(_base()._CONVERTERS):
            parent._modules[key] = _convert(child)
        elif len(child._modules):
            mirror_into(mine, child, f"{path}.")
        elif isinstance(child, type(mine)):
            mine.load_state_dict(child.state_dict())
        else:
            raise ValueError(f"{path}: {type(child).__name__} does not match ours, "
                             f"{type(mine).__name__}")


def _first_conv_options(conv: nn.Module) -> dict:
    """Family, norm, affine and bottleneck_convs of a converted conv (to build a network of the
    same kind)."""
    norm = conv.norm
    name = ("batch" if isinstance(norm, nn.BatchNorm2d)
            else "instance" if isinstance(norm, nn.InstanceNorm2d) else "none")
    return dict(family=conv.basis.family, norm=name, affine=getattr(norm, "affine", True),
                bottleneck_convs=isinstance(conv, KANBottleneckConv))


def _convert_ukanet(module: nn.Module) -> TCKUKANet:
    """UKANet of basic blocks (the only ones whose merge widths fit)."""
    if "BasicBlockTemplate" not in _class_names(module.layer1e[0]):
        raise ValueError(f"UKANet of {type(module.layer1e[0]).__name__}: only basic-block "
                         "UKANets convert (bottleneck-block ones cannot run)")
    stem = module.conv1
    if stem.stride != 1 or stem.padding != stem.kernel_size // 2:
        raise ValueError(f"UKANet: only 'same' stride-1 stems convert, got kernel "
                         f"{stem.kernel_size}, stride {stem.stride}, padding {stem.padding}")
    ours = TCKUKANet(
        2, module.input_channels, module.output.out_channels,
        layers=[len(getattr(module, f"layer{i}e")) for i in range(1, 5)],
        width_scale=stem.outdim // 8, groups=module.groups, stem_kernel_size=stem.kernel_size,
        **_first_conv_options(_convert(stem)))
    mirror_into(ours, module)
    return ours


def _convert_ukagnet(module: nn.Module) -> TCKUKAGNet:
    first = module.encoder[0][0]
    head = module.decoder[0][0]
    mixer = ("self-att" if "SelfKANtentionND" in _class_names(head) else
             "focal" if "KANFocalModulationND" in _class_names(head) else "conv")
    ours = TCKUKAGNet(
        2, first.inputdim, module.output.out_channels, depth=module.unet_depth,
        layers=len(module.encoder[0]), width_scale=first.outdim // 16, groups=first.groups,
        mixer=mixer, **_first_conv_options(_convert(first)))
    mirror_into(ours, module)
    return ours


#: torch-conv-kan class name -> converter (merged into ``convert._CONVERTERS``)
ATTENTION_CONVERTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "SelfKANtentionND": _convert_self_attention,
    "KANFocalModulationND": _convert_focal,
    "KAGNConvNDLayerV2": _convert_kagn_v2,
    "BottleNeckReLUConvNDLayer": _convert_relukan_bottleneck,
    "UKANet": _convert_ukanet,
    "UKAGNet": _convert_ukagnet,
}

__all__ = ["ATTENTION_CONVERTERS", "mirror_into"]
