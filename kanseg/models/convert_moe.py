"""torch-conv-kan's mixture-of-experts convs -> :class:`~kanseg.layers.moe.MoEKANConv`, for
:func:`~.convert.convert_torch_conv_kan`, and their state-dict layout for
:func:`~.torch_conv_kan.load_torch_conv_kan` (the MoE VGG and MoEResKANet checkpoints).

Covered:

- ``MoE{KAN,FastKAN,KALN,KACN,KAGN,WavKAN,FullBottleneckKAGN}Conv{1,2,3}DLayer``
  (``MoEKANConvBase``): whole KAN convs are the experts -> a :class:`MoEKANConv` of the
  experts, each converted by ``convert_torch_conv_kan`` (so WavKAN experts convert where
  WavKAN convs do);
- ``MoEBottleNeckKAGNConv{1,2,3}DLayer``: a bottleneck KAGN conv whose inner conv is a mixture
  of ``KAGNExpert``s (optionally gated through a ``pregate`` KAN layer) -> our bottleneck conv
  built with ``moe_inner=True``;
- the MoE VGGs ``MoEVGGKAGN`` and ``MoE_VGGKAGN_BN`` -> our VGG-KAN with ``moe_*`` options,
  through :func:`~.convert_models.convert_vgg` (like every torch-conv-kan VGG), whose layers
  map with :func:`moe_state_to_ours`;
- the MoEResKANets of MoE KALN convs or MoE bottleneck KAGN convs (``reskagnetbn_moe_*``:
  ``moe_inner=True``) -> our ResKANet with ``moe_*`` options, through
  :func:`~.convert_models.convert_reskanet` (instances) and
  :func:`~.torch_conv_kan.reskanet_from_state_dict` (state dicts, mapped the same way);
- the MoE DenseKANets (``densekagnet*moebn``, ``tiny_densekagnet_moebn``: ``moe_inner=True``)
  -> our DenseKANet with ``moe_*`` options, through
  :func:`~.convert_models.convert_densekanet` (instances).

Eval-mode outputs and load-balancing losses match; in training the gating noise matches too
for the same random state (dropout differs, as for the plain convs). The reference's constant
``mean`` / ``std`` buffers (its standard normal) and the outer ``w_gate`` / ``w_noise`` of
``MoEBottleNeckKAGNConv`` (never used by its forward) have no counterpart here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kanseg.layers import KANBottleneckConv, create_kan_conv
from kanseg.layers.moe import MoEKANConv

from . import convert as core
from .torch_conv_kan import (layer_to_theirs, channel_major_to_degree_major,
                             degree_major_to_channel_major, layer_state_to_ours,
                             norm_state_to_ours, norm_state_to_theirs)

_NORMAL = {"mean": torch.zeros(1), "std": torch.ones(1)}


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _cat_groups(theirs: dict[str, Tensor], name: str, groups: int) -> Tensor:
    """torch-conv-kan's per-group convs ``name.{g}`` as one weight."""
    return torch.cat([theirs[f"{name}.{g}.weight"] for g in range(groups)])


def _split_groups(weight: Tensor, name: str, groups: int) -> dict[str, Tensor]:
    return {f"{name}.{g}.weight": w for g, w in enumerate(weight.chunk(groups))}


def moe_state_to_ours(theirs: dict[str, Tensor], layer: nn.Module,
                      groups: int) -> dict[str, Tensor]:
    """One MoE layer's tensors (torch-conv-kan names, prefix removed) -> ``layer``'s: a
    :class:`MoEKANConv` of KAGN / KALN / KAJN experts, or a bottleneck conv whose ``core`` is
    one (``MoEBottleNeckKAGNConv``)."""
    if isinstance(layer, MoEKANConv):
        ours = {"w_gate": theirs["w_gate"], "w_noise": theirs["w_noise"]}
        for e, expert in enumerate(layer.experts):
            mapped = layer_state_to_ours(_sub(theirs, f"experts.{e}."), expert, groups)
            ours.update(_prefixed(mapped, f"experts.{e}."))
        return ours
    mixture: MoEKANConv = layer.core  # (its own unused w_gate / w_noise are left out)
    n_basis = mixture.experts[0].basis.n_basis
    ours = {name: _cat_groups(theirs, theirs_name, groups) for name, theirs_name in
            (("base_weight", "base_conv"), ("inner_proj.weight", "inner_proj"),
             ("out_proj.weight", "out_proj"))}
    ours.update({"core.w_gate": theirs["experts.w_gate"],
                 "core.w_noise": theirs["experts.w_noise"], **norm_state_to_ours(theirs, groups)})
    for e in range(mixture.num_experts):
        expert = _sub(theirs, f"experts.experts.{e}.")
        ours[f"core.experts.{e}.basis_weight"] = torch.cat(
            [degree_major_to_channel_major(w, n_basis) for w in expert["poly_weights"]])
        ours[f"core.experts.{e}.basis.beta_weights"] = expert["beta_weights"]
    return ours


def moe_state_to_theirs(ours: dict[str, Tensor], layer: nn.Module,
                        groups: int) -> dict[str, Tensor]:
    """Inverse of :func:`moe_state_to_ours` (KAGN experts), with the reference's constant
    ``mean`` / ``std`` buffers."""
    if isinstance(layer, MoEKANConv):
        theirs = {"w_gate": ours["w_gate"], "w_noise": ours["w_noise"], **_NORMAL}
        for e, expert in enumerate(layer.experts):
            mapped = layer_to_theirs(_sub(ours, f"experts.{e}."), expert, groups)
            theirs.update(_prefixed(mapped, f"experts.{e}."))
        return theirs
    mixture: MoEKANConv = layer.core
    n_basis = mixture.experts[0].basis.n_basis
    theirs = {"experts.w_gate": ours["core.w_gate"], "experts.w_noise": ours["core.w_noise"],
              **_prefixed(_NORMAL, "experts."), **norm_state_to_theirs(ours, groups),
              # the outer layer's own gate weights, which its forward never uses
              "w_gate": torch.zeros_like(ours["core.w_gate"]),
              "w_noise": torch.zeros_like(ours["core.w_noise"])}
    for name, theirs_name in (("base_weight", "base_conv"), ("inner_proj.weight", "inner_proj"),
                              ("out_proj.weight", "out_proj")):
        theirs.update(_split_groups(ours[name], theirs_name, groups))
    for e in range(mixture.num_experts):
        weight = ours[f"core.experts.{e}.basis_weight"]
        theirs[f"experts.experts.{e}.poly_weights"] = torch.stack(
            [channel_major_to_degree_major(w, n_basis) for w in weight.chunk(groups)])
        theirs[f"experts.experts.{e}.beta_weights"] = ours[f"core.experts.{e}.basis.beta_weights"]
    return theirs


def convert_moe(module: nn.Module) -> MoEKANConv:
    """``MoEKANConvBase`` (every ``MoE*Conv{1,2,3}DLayer`` of ``kan_convs/moe_kan.py``)."""
    experts = [core.convert_torch_conv_kan(expert) for expert in module.experts]
    ours = MoEKANConv(experts, top_k=module.k, noisy_gating=module.noisy_gating)
    ours.w_gate.copy_(module.w_gate)
    ours.w_noise.copy_(module.w_noise)
    return ours


def convert_moe_bottleneck(module: nn.Module) -> KANBottleneckConv:
    """``MoEBottleNeckKAGNConvND``: a KAGN bottleneck conv mixing only its inner conv."""
    mixture, expert = module.experts, module.experts.experts[0]
    norm, affine = core.norm_option(module.layer_norm[0], type(module).__name__)
    widest = max(module.input_size, module.output_size) // module.groups
    ours = create_kan_conv(
        "kagn", mixture.conv_dims, module.input_size, module.output_size, expert.kernel_size,
        stride=expert.stride, padding=expert.padding, dilation=expert.dilation,
        groups=module.groups, degree=expert.degree, norm=norm, affine=affine,
        dropout=expert.p_dropout, bottleneck=True, min_internal=0,
        dim_reduction=widest / (module.inner_dim + 0.5),  # reproduces its inner width
        moe_experts=mixture.num_experts, moe_top_k=mixture.k,
        moe_noisy_gating=mixture.noisy_gating, moe_inner=True)
    state = moe_state_to_ours(module.state_dict(), ours, module.groups)
    if mixture.pre_gate is not None:
        ours.core.gate_input = core.convert_torch_conv_kan(mixture.pre_gate)
        state.update(_prefixed(ours.core.gate_input.state_dict(), "core.gate_input."))
    ours.load_state_dict(state)
    return ours


MOE_CONVERTERS = {
    "MoEKANConvBase": convert_moe,
    "MoEBottleNeckKAGNConvND": convert_moe_bottleneck,
}

__all__ = ["MOE_CONVERTERS", "convert_moe", "convert_moe_bottleneck", "moe_state_to_ours",
           "moe_state_to_theirs"]
