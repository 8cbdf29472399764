"""Checkpoint folders, written atomically.

Layout of ``<run>/checkpoints/``::

    step-00000120/        a full resumable state (mid-epoch, every N steps)
    epoch-0003/           a full resumable state at the end of an epoch
        model.safetensors     inference weights (EMA weights when EMA is on)
        meta.json             {"epoch", "step", "metric", "monitor", ...}
        training_state.pt     optimizer, scheduler, scaler, EMA, counters, data position
        train_model.safetensors   the raw (non-EMA) weights, only when EMA is on
        rng-<rank>.pt         RNG states of every process
    last -> step-00000120     symlinks, swapped atomically
    best -> epoch-0003

A folder is staged as ``.tmp-<name>`` and renamed into place when complete; links are replaced
with ``os.replace``. A failed or killed write never touches the previous checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save

from kanseg.files import atomic_write_text
from kanseg.models.io import UnsafeFileError, load_state  # noqa: F401  (part of this API)

WEIGHTS = "model.safetensors"
TRAIN_WEIGHTS = "train_model.safetensors"
META = "meta.json"
STATE = "training_state.pt"


def save_weights(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors (tensors copied to CPU, contiguous, unshared);
    serialised in memory, so that a failed write raises ``OSError`` (full disk...)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    Path(path).write_bytes(save(tensors))


def save_state(state: Any, path: Path) -> None:
    """``torch.save`` a state of tensors and plain containers (see :func:`load_state`);
    serialised in memory, so that a failed write raises ``OSError``, not a C++ stream error."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    Path(path).write_bytes(buffer.getbuffer())


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict (never unpickles)."""
    return load_file(str(path))


def stage(root: Path, name: str) -> Path:
    """Create an empty staging folder for checkpoint ``name`` (main process only)."""
    tmp = Path(root) / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, name: str) -> Path:
    """Move a complete staging folder to ``root/name`` (replacing an older one of that name)."""
    final = tmp.parent / name
    if final.exists():
        old = tmp.parent / f".old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def link(root: Path, alias: str, name: str) -> None:
    """Point ``root/alias`` (``last`` or ``best``) at ``root/name`` atomically."""
    tmp = Path(root) / f".{alias}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, Path(root) / alias)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never one that ``last``/``best`` uses."""
    root = Path(root)
    keep = {os.readlink(root / a) for a in ("last", "best") if (root / a).is_symlink()}
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                   and not d.is_symlink()), key=_age)
    for d in dirs[:-keep_last] if keep_last > 0 else dirs:
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _age(folder: Path) -> tuple[int, int]:
    meta = read_meta(folder)
    return meta.get("step", -1), meta.get("epoch", -1)


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError):
        return {}


def write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    atomic_write_text(Path(folder) / META, json.dumps(dict(meta), indent=2) + "\n")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, random) as weights-only-loadable data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "random": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve(path: str | Path, prefer: str = "last") -> Path:
    """Checkpoint folder from a run folder, a ``checkpoints`` folder or a checkpoint folder.

    ``prefer`` is the policy for a run: ``"last"`` (resuming) or ``"best"`` (predicting; the
    last checkpoint when the run has no best one yet)."""
    if prefer not in ("last", "best"):
        raise ValueError(f"prefer must be 'last' or 'best', got {prefer!r}")
    path = Path(path)
    aliases = ("best", "last") if prefer == "best" else ("last",)
    candidates = [path, *(path / a for a in aliases), *(path / "checkpoints" / a for a in aliases)]
    for candidate in candidates:
        if (candidate / WEIGHTS).is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a run folder (with checkpoints/{aliases[0]}), a "
        f"checkpoints folder or a checkpoint folder holding {WEIGHTS}")
