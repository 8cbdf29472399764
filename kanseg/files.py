"""Atomic file writes: the one helper every output of kanseg and kanpeft goes through.

A file is written to a temporary name in its own folder, flushed to disk and renamed into
place (``os.replace``), so a crash or a full disk never leaves a half-written file, and an
existing file is only ever replaced by a complete one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(target: str | os.PathLike, write: Callable[[str], Any], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place
    (with the permissions a plain ``open`` would give). ``suffix`` ends the temporary name, for
    writers that pick the format by extension. Errors name ``target``."""
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    except OSError as err:  # e.g. a read-only folder: name the target, not a random temp name
        raise OSError(err.errno, f"cannot write {target}: {err.strerror}") from err
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename in (None, tmp):  # name the file the user asked for, not the temp
            raise OSError(err.errno, f"cannot write {target}: {err.strerror}") from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
