"""Pieces shared by the kanpeft methods: finding KAN layers, freezing, and running a KAN layer
with substituted weights (the adapters compute effective weights, then call :func:`kan_forward`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from kanseg.layers import KANBottleneckConv, KANConv
from kanseg.layers import conv_function

KAN_LAYER_TYPES = (KANConv, KANBottleneckConv)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass
class AdapterConfig:
    """Options every method shares.

    ``target_modules``: regular expressions matched (``re.fullmatch``) against module names;
    ``None`` adapts every KAN layer. ``train_norm``: also train the norm layers (BatchNorm,
    InstanceNorm with affine, GroupNorm). ``trainable_modules``: names of modules trained in full
    (a new classification head, a segmentation decoder); a name matches the module and its children.
    """

    target_modules: list[str] | None = None
    train_norm: bool = False
    trainable_modules: list[str] = field(default_factory=list)


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether module ``name`` is selected by ``patterns`` (``None`` selects everything)."""
    return patterns is None or any(re.fullmatch(p, name) for p in patterns)


def kan_layers(model: nn.Module, patterns: Sequence[str] | None = None
               ) -> Iterator[tuple[str, nn.Module]]:
    """Top-level KAN layers of ``model`` (a bottleneck's inner core is part of its bottleneck)."""
    cores = {id(m.core) for m in model.modules() if isinstance(m, KANBottleneckConv)}
    for name, module in model.named_modules():
        if isinstance(module, KAN_LAYER_TYPES) and id(module) not in cores and matches(name, patterns):
            yield name, module


def in_trainable_modules(name: str, names: Sequence[str]) -> bool:
    """Whether parameter/module ``name`` lies inside one of the modules ``names``."""
    return any(name == n or name.startswith(n + ".") for n in names)


def check_module_names(model: nn.Module, names: Sequence[str], option: str) -> None:
    """Clear error for ``trainable_modules`` entries that name no module of ``model``."""
    known = dict(model.named_modules())
    for n in names:
        if n not in known:
            raise ValueError(
                f"{option}: the model has no module named {n!r}; top-level modules are "
                f"{[k for k in known if k and '.' not in k]}"
            )


def norm_module_names(model: nn.Module) -> list[str]:
    """Names of the norm layers that carry parameters or running statistics."""
    return [n for n, m in model.named_modules()
            if isinstance(m, NORM_TYPES) and (any(True for _ in m.parameters(recurse=False))
                                              or any(True for _ in m.buffers(recurse=False)))]


def _use_running_statistics(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen BatchNorm: normalise with (and keep) its running statistics."""
    module.train(False)


def freeze_except(model: nn.Module, config: AdapterConfig) -> None:
    """Freeze every parameter, then unfreeze norm layers / full modules as ``config`` asks.

    Frozen BatchNorm layers are frozen completely: they use and keep their running statistics
    in training too (as torchvision's FrozenBatchNorm2d), so an adapter never depends on them.
    """
    check_module_names(model, config.trainable_modules, "trainable_modules")
    norms = set(norm_module_names(model)) if config.train_norm else set()
    for name, param in model.named_parameters():
        module_name = name.rpartition(".")[0]
        param.requires_grad_(module_name in norms
                             or in_trainable_modules(name, config.trainable_modules))
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
                and name not in norms and not in_trainable_modules(name, config.trainable_modules)):
            module.register_forward_pre_hook(_use_running_statistics)


def release_norm_statistics(model: nn.Module) -> None:
    """Undo the BatchNorm freezing of :func:`freeze_except` (after a merge)."""
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _use_running_statistics]:
            del hooks[key]


def kan_preactivation(layer: KANConv, x: Tensor, base_weight: Tensor | None,
                      basis_weight: Tensor, basis: nn.Module,
                      basis_params: dict[str, Tensor] | None = None) -> Tensor:
    """``conv(base_act(x), base_weight) + conv(basis(x), basis_weight)`` of a KANConv (no norm),
    with any of the weights or the basis module replaced. ``basis_params`` overrides the basis
    module's parameters (``torch.func.functional_call``)."""

    def conv(inp: Tensor, weight: Tensor) -> Tensor:
        return conv_function(layer.spatial_dims)(inp, weight, None, layer.stride, layer.padding,
                                            layer.dilation, layer.groups)

    def branches(inp: Tensor) -> Tensor:
        expanded = (functional_call(basis, basis_params, (inp,)) if basis_params
                    else basis(inp)).flatten(1, 2)
        y = conv(expanded, basis_weight)
        if base_weight is not None:
            y = y + conv(layer.base_activation(inp), base_weight)
        return y

    if layer.recompute and torch.is_grad_enabled():
        return checkpoint(branches, x, use_reentrant=False)
    return branches(x)


def kan_forward(layer: nn.Module, x: Tensor, *, base_weight: Tensor | None = None,
                basis_weight: Tensor | None = None, basis: nn.Module | None = None,
                basis_params: dict[str, Tensor] | None = None,
                out_proj_weight: Tensor | None = None,
                post_norm: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Forward of a :class:`KANConv` or :class:`KANBottleneckConv` with substituted weights.

    ``basis_weight``/``basis``/``basis_params`` refer to the basis branch (a bottleneck's core);
    ``post_norm`` is applied between the norm and the activation.
    """
    if layer.dropout is not None:
        x = layer.dropout(x)
    if isinstance(layer, KANBottleneckConv):
        core = layer.core
        inner = kan_preactivation(
            core, layer.inner_proj(x), None,
            core.basis_weight if basis_weight is None else basis_weight,
            core.basis if basis is None else basis, basis_params)
        proj = layer.out_proj
        y = proj._conv_forward(inner, proj.weight if out_proj_weight is None else out_proj_weight,
                               None)
        y = y + conv_function(layer.spatial_dims)(layer.base_activation(x),
                     layer.base_weight if base_weight is None else base_weight,
                     None, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        y = kan_preactivation(
            layer, x, layer.base_weight if base_weight is None else base_weight,
            layer.basis_weight if basis_weight is None else basis_weight,
            layer.basis if basis is None else basis, basis_params)
    y = layer.norm(y)
    if post_norm is not None:
        y = post_norm(y)
    return layer.act(y)


def basis_conv(layer: nn.Module) -> KANConv:
    """The KANConv holding the basis branch: the layer itself or a bottleneck's core."""
    return layer.core if isinstance(layer, KANBottleneckConv) else layer


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (``model`` itself cannot be replaced)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
