"""Imports point one way: layers -> models -> data -> engine -> applications -> CLIs.

Each layer is imported in a fresh interpreter, and no module of a higher layer may have been
loaded (ARCHITECTURE.md)."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APPLICATIONS = ["kanseg.inference", "kanseg.evaluation", "kanseg.bundle", "kanseg.commands",
                "kanseg.cli", "kanseg.training", "kanpeft"]
#: layer -> packages that must stay unloaded when it (all its modules) is imported
FORBIDDEN = {
    "kanseg.layers": ["kanseg.models", "kanseg.data", "kanseg.engine", "kanseg.config",
                      *APPLICATIONS],
    "kanseg.models": ["kanseg.data", "kanseg.engine", "kanseg.config", *APPLICATIONS],
    "kanseg.data": ["kanseg.engine", "kanseg.config", *APPLICATIONS],
    "kanseg.engine": ["kanseg.config", *APPLICATIONS],
}


def _modules(package: str) -> list[str]:
    """``package`` and every module under it."""
    path = REPO / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(path)])]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_loads_nothing_above_it(layer):
    code = (f"import importlib, json, sys\n"
            f"for name in {_modules(layer)!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    loaded = json.loads(out)
    above = sorted(m for m in loaded for f in FORBIDDEN[layer] if m == f or m.startswith(f + "."))
    assert not above, f"importing {layer} loaded {above}"
