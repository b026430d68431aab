"""Memory and CPU accounting of a process, and the allocator setting."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.net import memory
from tests.conftest import ROOT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_resident_size_follows_a_large_array_and_the_peak_remembers_it():
    before = memory.rss_mb()
    block = np.ones(200 * 2 ** 20 // 8)  # 200 MiB, every page touched
    during = memory.rss_mb()
    assert during - before > 150, (before, during)
    del block
    assert memory.peak_rss_mb() >= during - 0.01


def test_cpu_time_counts_work_done():
    start = memory.cpu_s()
    a = np.random.default_rng(0).standard_normal((300, 300))
    for _ in range(50):
        a = np.tanh(a @ a.T / 300)
    assert memory.cpu_s() > start


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_keeps_freed_blocks_for_reuse():
    """In a fresh process: after the setting, a freed 8 MiB block stays in
    the process (resident size does not drop), where glibc's default hands
    it back to the system at once."""
    code = """
import sys
import numpy as np
from pipeline.net import memory
if sys.argv[1] == "tuned":
    assert memory.tune_allocator()
base = memory.rss_mb()
block = np.ones(2 ** 20)       # 8 MiB, above glibc's default mmap threshold
held = memory.rss_mb()
del block
print(round(held - base), round(held - memory.rss_mb()))
"""
    out = {}
    for how in ("tuned", "default"):
        proc = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                              timeout=60, check=True, cwd=ROOT)
        out[how] = [int(v) for v in proc.stdout.split()]
    grew, released = out["default"]
    assert grew >= 7 and released >= 7        # glibc's default: returned on free
    grew, released = out["tuned"]
    assert grew >= 7 and released <= 1        # kept for the next batch's arrays
