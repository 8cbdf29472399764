"""The injection / merge / save / load machinery of kanpeft's own methods (basis, scales).

An adapter layer wraps one frozen KAN layer (``base_layer``) and knows how to fold itself
into a plain layer of the original class (:meth:`AdapterLayer.merged_layer`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kanseg.files import atomic_write, atomic_write_text
from kanseg.schema import from_dict, to_dict

from .common import (AdapterConfig, call_layer, freeze_except, kan_layers, merged_copy,
                     norm_module_names, release_norm_statistics, set_submodule)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterLayer(nn.Module):
    """Base class of the wrapper layers: ``base_layer`` stays frozen and untouched.

    A method gives :meth:`substitutions`, the effective tensors (and modules) that replace the
    base layer's; the forward runs the base layer's own forward with them and the merge writes
    them into a copy of it, so the two agree by construction."""

    method: str = ""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.config = config

    def substitutions(self) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
        """``(tensors, modules)`` by dotted name in ``base_layer`` (see :func:`call_layer`)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_layer(self.base_layer, x, *self.substitutions())

    def merged_layer(self) -> nn.Module:
        """A plain layer of the base layer's class with the adapter folded in."""
        with torch.no_grad():
            return merged_copy(self.base_layer, *self.substitutions())

    def signature(self) -> dict[str, Any]:
        """What an adapter trained on this layer expects of it: class and weight shapes."""
        return layer_signature(self.base_layer)


def layer_signature(layer: nn.Module) -> dict[str, Any]:
    """Class, basis family/degree and parameter shapes of a KAN layer."""
    basis = layer.basis
    return {
        "class": type(layer).__name__,
        "family": basis.family,
        "degree": basis.degree,
        "shapes": {k: list(v.shape) for k, v in layer.state_dict().items()},
    }


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """All adapter layers of ``model`` with their module names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def inject(model: nn.Module, config: AdapterConfig, layer_cls: type[AdapterLayer]) -> nn.Module:
    """Freeze ``model`` and wrap its KAN layers selected by ``config`` in ``layer_cls``."""
    if adapter_layers(model):
        raise ValueError("the model already has kanpeft adapters; merge() them first")
    freeze_except(model, config)
    targets = list(kan_layers(model, config.target_modules))
    if not targets:
        raise ValueError(
            f"no KAN layer (KANConv / KANBottleneckConv) of the model matches target_modules="
            f"{config.target_modules!r}"
        )
    for name, layer in targets:
        wrapper = layer_cls(layer, config)
        if not name:
            return wrapper
        set_submodule(model, name, wrapper)
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its merged plain layer; all parameters become trainable."""
    if isinstance(model, AdapterLayer):
        model = model.merged_layer()
    for name, layer in adapter_layers(model):
        set_submodule(model, name, layer.merged_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    release_norm_statistics(model)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters plus norm running statistics."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for module_name in norm_module_names(model):
        module = model.get_submodule(module_name)
        for n, b in module.named_buffers(recurse=False):
            state[f"{module_name}.{n}"] = b.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (small: adapter only)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no kanpeft adapter layers to save (was it prepared?)")
    config = layers[0][1].config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "kanpeft_method": layers[0][1].method,
        "config": to_dict(config),
        "layers": {name or "<root>": layer.signature() for name, layer in layers},
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(adapter_state(model), p))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The JSON config of a saved adapter, with a clear error if it is missing or invalid."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config {path} (expected a folder written by save)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def check_architecture(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    """Raise if ``model``'s KAN layers differ from those the adapter was trained on."""
    config_patterns = meta["config"].get("target_modules")
    found = {name or "<root>": layer_signature(layer) for name, layer in kan_layers(model, config_patterns)}
    expected = meta["layers"]
    for name, signature in expected.items():
        if name not in found:
            raise ValueError(
                f"adapter {directory} does not fit this backbone: it adapts layer {name!r}, which "
                f"the model does not have (its KAN layers: {sorted(found)[:8]}...)"
            )
        if found[name] != signature:
            diff = {k: (signature[k], found[name][k]) for k in signature if signature[k] != found[name].get(k)}
            raise ValueError(
                f"adapter {directory} does not fit this backbone: layer {name!r} differs "
                f"(adapter's vs model's): {diff}"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"adapter {directory} does not fit this backbone: the model has KAN layers "
                         f"{extra[:8]} that the adapter does not cover")


def load(model: nn.Module, directory: str | Path, config_cls: type[AdapterConfig],
         layer_cls: type[AdapterLayer]) -> nn.Module:
    """Prepare ``model`` as the saved adapter was prepared, then load its weights."""
    directory = Path(directory)
    meta = read_config(directory)
    check_architecture(model, meta, directory)
    config = from_dict(config_cls, meta["config"], f"{directory / CONFIG_NAME}:config")
    prepared = inject(model, config, layer_cls)
    state = load_file(str(directory / WEIGHTS_NAME))
    own = prepared.state_dict()
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(
                f"adapter {directory}: tensor {key!r} {tuple(value.shape)} does not fit the model "
                f"({'missing' if key not in own else tuple(own[key].shape)})"
            )
    prepared.load_state_dict(state, strict=False)
    return prepared
