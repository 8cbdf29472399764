"""The allocator setting of the command-line programs: freed memory is reused, not faulted in
again (glibc only)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kanseg.allocator import keep_freed_memory

PROBE = """
import resource, sys, torch
from kanseg.allocator import keep_freed_memory
tuned = keep_freed_memory()
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(40 << 18).fill_(1.0)  # 40 MiB (glibc maps blocks over 32 MiB afresh), freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(16):  # glibc settles on a reusable block after a few rounds
    faults_of_one_allocation()
print(int(tuned), sum(faults_of_one_allocation() for _ in range(4)))
"""


def _probe(allocator: str) -> tuple[bool, int]:
    env = {**os.environ, "KANSEG_ALLOCATOR": allocator}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    tuned, tuned_faults = _probe("keep")
    system, system_faults = _probe("system")
    assert tuned and not system
    # 4 x 40 MiB is 40960 pages of 4 KiB: the tuned process reuses the freed block, the
    # default one maps it afresh at every allocation
    assert tuned_faults < 64, tuned_faults
    assert tuned_faults <= system_faults


def test_system_setting_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("KANSEG_ALLOCATOR", "system")
    assert keep_freed_memory() is False
