"""Typed config sections: dataclasses built from plain dicts with errors that name the key.

Every config section (data, model, trainer, ...) is a dataclass; :func:`from_dict` checks
unknown keys, types (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``Optional``, lists,
tuples, dicts, nested dataclasses) and reports the dotted path of the offending key together
with what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
import warnings
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

#: numbers like ``1e-3`` that YAML 1.1 leaves as strings
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names its dotted path."""


class DeprecatedKeyWarning(FutureWarning):
    """A config uses the old name of a renamed key (it still works)."""


class DeprecatedOptionWarning(DeprecationWarning):
    """A model was given the old name of a renamed option (it still works; see
    :func:`kanseg.models.registry.renamed_options`). The CLIs show it like a
    :class:`DeprecatedKeyWarning` (:func:`show_deprecations_plainly`)."""


def show_deprecations_plainly(prog: str) -> None:
    """Show config-key and model-option deprecations as one ``<prog>: warning: ...`` line on
    stderr, without a source line (a CLI's ``main`` calls it first)."""
    # a main() called again in one process wraps the original showwarning again
    show = getattr(warnings.showwarning, "wrapped", warnings.showwarning)
    # a DeprecationWarning, hidden by default outside __main__: show it (once per place)
    warnings.filterwarnings("default", category=DeprecatedOptionWarning)

    def plain(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, (DeprecatedKeyWarning, DeprecatedOptionWarning)):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    plain.wrapped = show  # type: ignore[attr-defined]
    warnings.showwarning = plain


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


def _renamed(cls: type, data: dict, path: str) -> dict:
    """``data`` with the old keys of ``cls.RENAMED_KEYS`` (old -> new) under their new names,
    warning once per key; both names at once is an error."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if not any(old in data for old in renamed):
        return data
    prefix = f"{path}." if path else ""
    data = dict(data)
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(f"{prefix}{old} and {prefix}{new} are the same setting "
                              f"({old} is its deprecated name); give only {prefix}{new}")
        warnings.warn(f"config key {prefix}{old} is deprecated; use {prefix}{new}",
                      DeprecatedKeyWarning, stacklevel=3)
        data[new] = data.pop(old)
    return data


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types recursively."""
    where = path or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    data = _renamed(cls, data, path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; allowed keys in {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"missing required key '{prefix}{missing[0]}' in {where}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain (YAML-safe) dict of a dataclass tree; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
