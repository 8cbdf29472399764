"""Shared fixtures."""
from __future__ import annotations

import importlib
import locale
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable

import pytest
import torch

from kanseg.config import config_from_dict, save_config
from kanseg.engine.checkpoint import save_weights


@pytest.fixture(autouse=True)
def _keep_locale():
    """SimpleITK's DICOM writer (GDCM) switches the process locale to "C", after which text
    from subprocesses decodes as ASCII; put the locale back after each test."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture()
def saved_run(tmp_path: Path) -> Callable[[dict], Path]:
    """Make ``tmp_path/run``, a run folder of a config dict: its ``config.yaml`` and
    ``checkpoints/best`` holding the model's seeded random weights."""
    def make(config: dict) -> Path:
        cfg = config_from_dict(config)
        run = tmp_path / "run"
        (run / "checkpoints" / "best").mkdir(parents=True)
        save_config(cfg, run / "config.yaml")
        torch.manual_seed(0)
        save_weights(cfg.model.build().state_dict(), run / "checkpoints/best/model.safetensors")
        return run
    return make


@pytest.fixture()
def read_only_folder(tmp_path):
    """An existing, empty folder nothing can be created in, even by root (``chattr +i``);
    skips where the file system or the user cannot set the immutable flag."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    try:
        subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot make a folder immutable here: {err}")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


#: torch-conv-kan's source, next to this repository (read in parity tests, never copied)
TCK = Path(__file__).resolve().parents[2] / "shared" / "reference" / "torch-conv-kan"


def import_reference(*names: str) -> tuple:
    """torch-conv-kan modules (``"kan_convs"``, ``"models.ukanet"``...) imported from
    :data:`TCK`; skips the test when the reference checkout is absent."""
    if not (TCK / "kan_convs").is_dir():
        pytest.skip(f"torch-conv-kan reference not found at {TCK}")
    sys.path.insert(0, str(TCK))
    try:
        return tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(TCK))


def import_reference_models(*names: str) -> tuple:
    """Modules of torch-conv-kan's ``models`` (``"densekanet"``, ``"vggkan"``...) imported as
    ``tck_models.<name>``, without the package ``__init__`` (which imports every model and
    their extra dependencies); skips the test when the reference checkout is absent."""
    if not (TCK / "models").is_dir():
        pytest.skip(f"torch-conv-kan reference not found at {TCK}")
    package = sys.modules.setdefault("tck_models", types.ModuleType("tck_models"))
    package.__path__ = [str(TCK / "models")]
    return import_reference(*(f"tck_models.{name}" for name in names))
