"""Model registry in the style of timm: ``register_model`` + ``create_model(name, **kwargs)``."""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kanseg.layers import BASIS_REGISTRY, LAYER_OPTIONS
from kanseg.layers.errors import OptionError, UnknownOptionError
from kanseg.schema import DeprecatedOptionWarning


@dataclass(frozen=True)
class ModelSpec:
    """One registered network: how to build it and what it is."""

    name: str
    builder: Callable[..., nn.Module]
    dims: tuple[int, ...]
    task: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, builder: Callable[..., nn.Module] | None = None, *,
                   dims: tuple[int, ...] = (2, 3), task: str = "segmentation",
                   description: str = "", **defaults: Any):
    """Register ``builder`` (a class or function) under ``name``.

    Use as ``register_model("name", Builder, depth=18)`` or as a decorator
    ``@register_model("name")``. ``defaults`` are keyword arguments applied before the user's.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        _MODELS[name] = ModelSpec(name, fn, tuple(dims), task, dict(defaults), doc)
        return fn

    return wrap(builder) if builder is not None else wrap


def rename_options(renamed: Mapping[str, str], options: dict[str, Any],
                   stacklevel: int = 1) -> dict[str, Any]:
    """``options`` with the old names of ``renamed`` (old -> new) under their new names, a
    :class:`DeprecatedOptionWarning` per old name (attributed ``stacklevel`` frames up, 1: the
    caller); both names at once is an :class:`OptionError` for the new name."""
    if not any(old in options for old in renamed):
        return options
    options = dict(options)
    for old, new in renamed.items():
        if old not in options:
            continue
        if new in options:
            raise OptionError(new, f"{old} and {new} are the same option ({old} is its "
                                   f"deprecated name); give only {new}")
        warnings.warn(f"model option {old} is deprecated; use {new}", DeprecatedOptionWarning,
                      stacklevel=stacklevel + 1)
        options[new] = options.pop(old)
    return options


def renamed_options(**renamed: str) -> Callable[[type], type]:
    """Class decorator: the model still takes the old option names of ``renamed``
    (``old="new"``), with a deprecation warning, from ``create_model`` and direct construction
    alike. ``cls.RENAMED_OPTIONS`` records them; the signature shows the new names only."""

    def wrap(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **rename_options(renamed, kwargs, stacklevel=2))

        cls.__init__ = __init__
        cls.RENAMED_OPTIONS = {**getattr(cls, "RENAMED_OPTIONS", {}), **renamed}
        return cls

    return wrap


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name`` (:class:`OptionError` for ``name``,
    listing the choices)."""
    if name not in _MODELS:
        raise OptionError("name", f"unknown model {name!r}; registered models: "
                                  f"{', '.join(list_models())}")
    return _MODELS[name]


def renamed_model_options(name: str, options: dict[str, Any],
                          stacklevel: int = 1) -> dict[str, Any]:
    """``options`` of model ``name`` with its deprecated option names (the builder's
    ``RENAMED_OPTIONS``) under their new names: :func:`rename_options`."""
    renamed = getattr(get_model_spec(name).builder, "RENAMED_OPTIONS", {})
    return rename_options(renamed, options, stacklevel + 1)


def family_option_names(family: str) -> set[str]:
    """Keyword options accepted by KAN ``family`` (basis options plus layer options)."""
    if family not in BASIS_REGISTRY:
        raise OptionError("family",
                          f"family must be one of {sorted(BASIS_REGISTRY)}, got {family!r}")
    params = inspect.signature(BASIS_REGISTRY[family].__init__).parameters
    names = {p for p in params if p not in ("self", "in_channels", "kernel_numel")}
    return names | set(LAYER_OPTIONS)


def accepted_arguments(name: str, kwargs: dict[str, Any] | None = None) -> set[str]:
    """Keyword arguments model ``name`` accepts (deprecated names included); for KAN networks,
    those of the family in ``kwargs`` (default ``kagn``) are included."""
    builder = get_model_spec(name).builder
    params = inspect.signature(builder).parameters
    allowed = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    allowed |= set(getattr(builder, "RENAMED_OPTIONS", {}))
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        default = params["family"].default if "family" in params else "kagn"
        allowed |= family_option_names((kwargs or {}).get("family", default))
    return allowed


def _check_kwargs(spec: ModelSpec, kwargs: dict[str, Any]) -> None:
    allowed = accepted_arguments(spec.name, kwargs)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise UnknownOptionError(unknown[0], f"unknown argument(s) {unknown} for model "
                                             f"{spec.name!r}; accepted: {sorted(allowed)}")
    if "spatial_dims" in kwargs and kwargs["spatial_dims"] not in spec.dims:
        raise OptionError(
            "spatial_dims", f"model {spec.name!r} supports spatial_dims in {spec.dims}, "
            f"got {kwargs['spatial_dims']!r}"
        )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` over its registered defaults.
    A bad name or option raises :class:`~kanseg.layers.errors.OptionError` naming its key; an
    option's deprecated name (the builder's ``RENAMED_OPTIONS``) warns and counts as the new one.

    The model's ``model_config`` attribute records ``{"name": name, **arguments}`` (what
    :func:`kanseg.models.io.save_model` writes as ``config.json``), under the new names.
    """
    spec = get_model_spec(name)
    kwargs = renamed_model_options(name, kwargs, stacklevel=2)
    merged = {**spec.defaults, **kwargs}
    _check_kwargs(spec, merged)
    model = spec.builder(**merged)
    model.model_config = {"name": name, **merged}
    return model


def resolved_config(model: nn.Module) -> dict[str, Any]:
    """``model.model_config`` completed with the builder's defaults for arguments not given."""
    config = getattr(model, "model_config", None)
    if not config:
        raise ValueError("the model was not built by kanseg.models.create_model")
    params = inspect.signature(get_model_spec(config["name"]).builder).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    return {**defaults, **config}


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameter count of ``create_model(name, **kwargs)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ModelSpec", "accepted_arguments", "count_parameters", "create_model", "family_option_names", "get_model_spec",
    "list_models", "register_model", "rename_options", "renamed_model_options", "renamed_options",
    "resolved_config",
]
