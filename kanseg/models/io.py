"""Save / load our models as a folder: ``config.json`` (registry name + kwargs) and
``model.safetensors``. Never unpickles; files are written atomically."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
import os
import pickle
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import nn

from kanseg.files import atomic_write

from .registry import create_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def save_model(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model`` (built by :func:`create_model`) to ``folder``; returns the folder."""
    config = getattr(model, "model_config", None)
    if not config:
        raise ValueError("save_model needs a model built by kanseg.models.create_model "
                         "(it records the name and arguments in model.model_config)")
    text = json.dumps(config, indent=2, sort_keys=True)  # fails early on non-JSON arguments
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous()
               for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(text))
    return folder


def load_model(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the model saved by :func:`save_model` and load its weights (strict), eval mode."""
    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (a saved model folder holds "
                                    f"{CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"{folder / CONFIG}: expected an object with a 'name' key")
    config = dict(config)
    model = create_model(config.pop("name"), **config)
    try:
        state = load_file(folder / WEIGHTS)
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{folder / WEIGHTS}: cannot read ({err})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                    for k, v in state.items() if k in expected and v.shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{folder / WEIGHTS} does not match the model of {CONFIG}:"
            + (f"\n  missing keys: {missing}" if missing else "")
            + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )
    model.load_state_dict(state, strict=True)
    return model.eval()



@dataclass
class InitReport:
    """What :func:`load_matching` did: tensors loaded, and those left at their initial values."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model
    mismatched: list[str] = field(default_factory=list)  # "name: source shape -> model shape"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, names in (("re-initialised (shape differs)", self.mismatched),
                             ("not in the source, kept at initialisation", self.missing),
                             ("in the source but not in the model, skipped", self.unexpected)):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        return "; ".join(lines)


def load_matching(model: nn.Module, state: dict[str, Any], strict: bool = False) -> InitReport:
    """Copy every tensor of ``state`` whose name and shape match ``model``'s; the others (for
    example a head with another number of classes) keep their initial values and are reported.
    ``strict=True`` makes any difference a ValueError listing it, and loads nothing. A source
    of which no tensor matches (another architecture) is a ValueError in either mode."""
    own = model.state_dict()
    report = InitReport()
    for name, value in state.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(own[name].shape):
            report.mismatched.append(f"{name}: {tuple(value.shape)} -> {tuple(own[name].shape)}")
        else:
            report.loaded.append(name)
    report.missing = [name for name in own if name not in state]
    if state and not report.loaded:
        raise ValueError(f"none of its {len(state)} tensors fits the model (a network of "
                         f"another architecture or size?); first names: "
                         f"{', '.join(list(state)[:3])}; the model's: {', '.join(list(own)[:3])}")
    if strict and not report.complete:
        raise ValueError(f"the initial weights do not match the model: {report.summary()}")
    model.load_state_dict({name: state[name] for name in report.loaded}, strict=False)
    return report


class UnsafeFileError(ValueError):
    """A state file holds pickled objects beyond tensors and plain containers; not loaded."""


def load_state(path: Path) -> Any:
    """Load a ``torch.save``-d state of tensors and plain containers, never unpickling objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        raise UnsafeFileError(
            f"refused to load {path}: it holds pickled Python objects beyond tensors and plain "
            f"containers (possibly malicious; only files written by kanseg are loaded): "
            f"{reason[-1] if reason else 'unpickling refused'}") from err


__all__ = ["CONFIG", "WEIGHTS", "InitReport", "UnsafeFileError", "atomic_write", "load_matching",
           "load_model", "load_state", "save_model"]
