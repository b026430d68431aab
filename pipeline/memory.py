"""How much memory this process holds: resident now, and its peak."""
from __future__ import annotations

import os
import resource
import sys

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_seen = 0.0  # the largest rss_mb() has read


def rss_mb() -> float | None:
    """Resident set size now, in MiB (Linux; None where /proc is missing)."""
    global _seen
    try:
        with open("/proc/self/statm") as f:
            mb = int(f.read().split()[1]) * _PAGE / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None
    _seen = max(_seen, mb)
    return mb


def peak_rss_mb() -> float:
    """The largest resident set this process has had, in MiB: the kernel's
    high-water mark, which it updates lazily (pages returned to the system
    without an unmap can leave it below a size read earlier), or the
    largest size read here, whichever is larger."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kernel = peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes vs KiB
    return max(kernel, _seen, rss_mb() or 0.0)
