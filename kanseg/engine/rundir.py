"""Run folders are never clobbered and never shared by two live trainings.

``kanseg train`` refuses a folder that already holds a run unless it resumes it, or, with
``--overwrite``, moves the old run aside whole. While it trains, ``<run>/train.lock``
(``{"pid", "host", "started"}``, created with ``O_EXCL``) keeps a second process out; a lock
whose process is dead (same host) is stale and taken over with a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("kanseg")

LOCK = "train.lock"
#: files and folders that mark a folder as holding a (started) run
RUN_MARKERS = ("config.yaml", "metrics.csv", "checkpoints")


class RunDirError(ValueError):
    """The run folder holds another run or is in use by another training."""


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the files of a started run."""
    return any((run_dir / name).exists() for name in RUN_MARKERS)


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.replaced-<UTC time>`` (whole, nothing deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    os.replace(run_dir, target)
    return target


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock holder may still run: unknown holders and other hosts count as alive."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy_message(run_dir: Path, path: Path, holder: dict[str, Any]) -> str:
    if not holder:
        who = "a process that left an empty or unreadable lock"
    else:
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} "
               f"(started {holder.get('started')})")
    return (f"run folder {run_dir} is in use by {who}; wait for that training to end, or "
            f"choose another --run-dir. If no training uses it, delete {path}")


def acquire_lock(run_dir: Path) -> Path:
    """Create ``run_dir/train.lock`` atomically; take over a stale lock of a dead process."""
    path = run_dir / LOCK
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if _alive(holder):
                raise RunDirError(_busy_message(run_dir, path, holder)) from None
            log.warning("removing the stale lock %s of pid %s, which no longer runs",
                        path, holder["pid"])
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        return path
    raise RunDirError(_busy_message(run_dir, path, _read_lock(path)))


def release_lock(path: Path) -> None:
    """Delete the lock if this process still holds it."""
    if _read_lock(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Hold ``run_dir`` for one training: refuse a folder in use or one with a previous run
    (unless ``resume``; with ``overwrite`` the old run is moved aside first)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if (run_dir / LOCK).exists():  # a live holder is refused before anything is moved
        release_lock(acquire_lock(run_dir))
    if holds_run(run_dir) and not resume:
        if not overwrite:
            raise RunDirError(
                f"run folder {run_dir} already holds a run (config.yaml, metrics.csv or "
                f"checkpoints/); continue it with --resume, choose a new --run-dir, or pass "
                f"--overwrite to move the old run aside")
        log.warning("moved the previous run in %s to %s", run_dir, move_aside(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(run_dir)
    try:
        yield lock
    finally:
        release_lock(lock)
