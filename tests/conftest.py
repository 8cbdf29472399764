"""Shared fixtures."""
from __future__ import annotations

import locale
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
