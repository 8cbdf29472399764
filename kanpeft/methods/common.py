"""Pieces shared by the kanpeft methods: finding KAN layers, freezing, and running a KAN layer
with substituted tensors (the adapters compute effective weights, then call :func:`call_layer`,
which runs the layer's own forward; :func:`merged_copy` writes the same tensors into a copy).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from torch import Tensor, nn
from torch.func import functional_call

from kanseg.layers import KANBottleneckConv, KANConv

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


def _view(module: nn.Module, replace: Mapping[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` that shares its parameters, buffers and submodules except the
    submodules named (dotted) in ``replace``; ``module`` itself is not changed."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._parameters = dict(module._parameters)
    for name, new in replace.items():
        head, _, rest = name.partition(".")
        view._modules[head] = _view(view._modules[head], {rest: new}) if rest else new
    return view


def call_layer(layer: nn.Module, x: Tensor, tensors: Mapping[str, Tensor],
               modules: Mapping[str, nn.Module] | None = None) -> Tensor:
    """The layer's own forward on ``x`` with ``tensors`` (dotted parameter names, e.g.
    ``basis_weight``, ``core.basis.beta_weights``, ``norm.bias``) substituted by
    :func:`torch.func.functional_call`, and the submodules ``modules`` (e.g. a basis with more
    degrees) swapped in a shallow view of the layer. KAN convolutions thus run on their fused
    ``ExpandConv`` path (recompute, analytic backward, conv strategy)."""
    if modules:
        layer = _view(layer, modules)
    return functional_call(layer, dict(tensors), (x,))


def merged_copy(layer: nn.Module, tensors: Mapping[str, Tensor],
                modules: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """A deep copy of ``layer`` with copies of ``modules`` set and ``tensors`` written as its
    parameters: the plain layer that computes what :func:`call_layer` computes."""
    merged = copy.deepcopy(layer)
    for name, module in (modules or {}).items():
        set_submodule(merged, name, copy.deepcopy(module))
    for name, value in tensors.items():
        owner, _, leaf = name.rpartition(".")
        setattr(merged.get_submodule(owner), leaf, nn.Parameter(value.detach().clone()))
    return merged


def basis_conv(layer: nn.Module) -> KANConv:
    """The KANConv holding the basis branch: the layer itself or a bottleneck's core."""
    return layer.core if isinstance(layer, KANBottleneckConv) else layer


def basis_prefix(layer: nn.Module) -> str:
    """The name prefix of :func:`basis_conv` inside ``layer`` (``""`` or ``"core."``)."""
    return "core." if isinstance(layer, KANBottleneckConv) else ""


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (``model`` itself cannot be replaced)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
