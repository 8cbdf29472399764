"""Keep freed memory in the process: the memory allocator setting of the command-line programs.

glibc's malloc serves large blocks with fresh pages (mmap) and hands freed memory back to the
system, so a training step that allocates and frees the same activations every time faults
in all of their pages again, at every step. On the 2-core development machine that is 20-30%
of a UKANet-3D or MONAI UNet training step (`kanseg models --cost`, see README's
Performance). :func:`keep_freed_memory` raises glibc's mmap and trim thresholds so that blocks
up to :data:`KEEP_BYTES` come from the heap and freed memory stays there for reuse; the price
is that the process's resident memory stays at its peak instead of shrinking between steps.
``kanseg`` and ``kanpeft`` (so the benchmarks that run them) and ``benchmarks/layers.py`` call
it first; ``KANSEG_ALLOCATOR=system`` keeps glibc's defaults. Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

#: blocks up to this size come from the heap, and up to this much freed memory is kept
KEEP_BYTES = 1 << 30
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module docstring); True if they were set."""
    if os.environ.get("KANSEG_ALLOCATOR", "").lower() == "system" or sys.platform != "linux":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(option, KEEP_BYTES) == 1
               for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
