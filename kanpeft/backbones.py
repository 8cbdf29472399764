"""The pretrained network a fine-tuning starts from, from any source kanseg writes or reads:

- a kanseg run folder (``config.yaml`` + ``checkpoints/``; its best checkpoint, else its last),
  one of its checkpoint folders or its ``model.safetensors`` (``kanseg.inference.load_run``);
- a kanseg model folder (``config.json`` naming a registered model + ``model.safetensors``,
  :func:`kanseg.models.io.load_model`);
- a torch-conv-kan checkpoint folder or state-dict file, or a HuggingFace hub id
  (:func:`kanseg.models.torch_conv_kan.load_torch_conv_kan`).

Nothing is unpickled: weights are safetensors, or ``.pt`` files loaded weights-only.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from kanseg.models.io import CONFIG, load_model
from kanseg.models.torch_conv_kan import load_torch_conv_kan
from kanseg.schema import ConfigError

RUN_CONFIG = "config.yaml"
EXPECTED = ("a kanseg run folder (config.yaml + checkpoints/), one of its checkpoint folders, a "
            "kanseg model folder (config.json naming a model + model.safetensors), a "
            "torch-conv-kan checkpoint folder or .safetensors/.pt file, or a HuggingFace hub id")


def run_folder(path: Path) -> Path | None:
    """The kanseg run folder that ``path`` is or lies in (its ``checkpoints`` folder, a
    checkpoint folder, or a weights file in one), or None."""
    for folder in [path, *path.parents][:4]:
        if (folder / RUN_CONFIG).is_file() and (folder / "checkpoints").is_dir():
            return folder
    return None


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds a kanseg model folder's ``config.json`` (one naming a model)."""
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "name" in config


def load_backbone(source: str) -> nn.Module:
    """The pretrained network of ``source`` (see the module docstring), in eval mode."""
    if not source:
        raise ConfigError(f"backbone: empty; give {EXPECTED}")
    path = Path(source).expanduser()
    run = run_folder(path) if path.exists() else None
    if run is not None:
        from kanseg.inference import load_run

        return load_run(path, run / RUN_CONFIG)[1]
    if path.is_dir() and is_model_folder(path):
        return load_model(path)
    if path.is_dir() and not (path / CONFIG).is_file():
        raise FileNotFoundError(f"backbone {path}: the folder holds no {RUN_CONFIG} with "
                                f"checkpoints/ and no {CONFIG}; expected {EXPECTED}")
    try:
        return load_torch_conv_kan(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"backbone {source}: {err}; expected {EXPECTED}") from None
